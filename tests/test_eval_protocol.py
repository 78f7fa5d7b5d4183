"""Evaluation is pinned: every result records what its numbers depend on (the weights' sha256, the split and its
shard files, resolution, frame sampling, re-rank depth, sizes), and evaluating twice gives the same numbers."""
import torch

from x2vlm.data.shapesworld import generate
from x2vlm.data.shards import write_shards
from x2vlm.data.video_formats import videoqa_to_shards
from x2vlm.eval.run import evaluate_checkpoint
from x2vlm.model import X2VLM
from x2vlm.train.checkpoint import export_weights, weights_sha256


def test_evaluation_records_its_protocol_and_repeats_exactly(video_finetuning, tmp_path):
    v = video_finetuning
    cfg = v.config("eval", f"{{name: qa, kind: video_qa, shards: [{','.join(v.qa)}]}}",
                   f"model.qa_answers={v.answers}")
    torch.manual_seed(2)
    model = X2VLM(cfg.model, cfg.loss, len(v.tokenizer), v.tokenizer.pad_token_id)
    export_weights(model.state_dict(), cfg, tmp_path / "ckpt", str(v.root / "tok"))
    images = write_shards(generate("heldout", 12, seed=5, image_size=64), str(tmp_path), "heldout", 12)
    qa_test = videoqa_to_shards(v.files["qa"]["test"], v.files["videos"], str(tmp_path / "qa"), "test",
                                ans2label=str(v.root / "qa" / "ans2label.json"))
    settings = dict(image_shards=images, region_shards=images, video_shards=v.retrieval, videoqa_shards=qa_test,
                    fps=1.0, max_frames=4, rerank_k=4)
    first = evaluate_checkpoint(str(tmp_path / "ckpt"), **settings)
    assert evaluate_checkpoint(str(tmp_path / "ckpt"), **settings) == first

    sha = weights_sha256(tmp_path / "ckpt")
    video = {"image_size": 64, "fps": 1.0, "max_frames": 4, "aggregator": "attention"}
    assert first["image_retrieval"]["protocol"] == {
        "checkpoint_sha256": sha, "split": "heldout", "shards": ["heldout-000000.tar"], "image_size": 64,
        "rerank_k": 4, "n_queries": 12, "pool_size": 12}
    assert first["grounding"]["protocol"]["split"] == "heldout"
    assert first["video_retrieval"]["protocol"] == {
        "checkpoint_sha256": sha, "split": "train", "shards": ["train-000000.tar", "train-000001.tar"], **video,
        "rerank_k": 4, "n_queries": 16, "pool_size": 16}
    assert first["video_direction"]["protocol"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert first["video_qa"]["protocol"] == {
        "checkpoint_sha256": sha, "split": "test", "shards": ["test-000000.tar"], **video,
        "n_questions": sum(len(c["qa"]) for c in v.test_clips), "n_clips": 4}
