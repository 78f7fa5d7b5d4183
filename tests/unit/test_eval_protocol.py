"""Evaluation is pinned: every result records what its numbers depend on (the weights' sha256, the split and its
shard files, resolution, frame sampling, re-rank depth, sizes), and evaluating twice gives the same numbers; video
QA accuracy, accuracy by type and chance on a hand-made example."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from x2vlm.config import SourceConfig
from x2vlm.data.formats.video import videoqa_to_shards
from x2vlm.data.samples import write_shards
from x2vlm.demo.shapesworld import generate
from x2vlm.eval.run import evaluate_checkpoint
from x2vlm.eval.videoqa import evaluate_videoqa
from x2vlm.pretrained import build_model, export_weights, weights_sha256


def test_evaluation_records_its_protocol_and_repeats_exactly(video_finetuning, tmp_path):
    v = video_finetuning
    cfg = v.config("eval", SourceConfig(name="qa", kind="video_qa", shards=v.qa), **{"model.qa_answers": v.answers})
    torch.manual_seed(2)
    model = build_model(cfg, v.tokenizer)
    export_weights(model.state_dict(), cfg, tmp_path / "ckpt", str(v.root / "tok"))
    images = write_shards(generate("heldout", 12, seed=5, image_size=64), str(tmp_path), "heldout", 12)
    qa_test = videoqa_to_shards(v.files["qa"]["test"], v.files["videos"], str(tmp_path / "qa"), "test",
                                ans2label=str(v.root / "qa" / "ans2label.json"))
    settings = dict(image_shards=images, region_shards=images, video_shards=v.retrieval, videoqa_shards=qa_test,
                    fps=1.0, max_frames=4, rerank_k=4)
    first = evaluate_checkpoint(str(tmp_path / "ckpt"), **settings)
    assert evaluate_checkpoint(str(tmp_path / "ckpt"), **settings) == first

    sha = weights_sha256(tmp_path / "ckpt")
    video = {"image_size": 64, "fps": 1.0, "max_frames": 4, "aggregator": "attention", "seek": "exact"}
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


def test_evaluation_at_another_resolution_and_more_frames(video_finetuning, tmp_path, caplog):
    """An export of 64 px with an 8-frame embedding evaluated at 96 px on clips of 10 frames: the tables are
    resized as the model loads, and the protocol records what was evaluated."""
    v = video_finetuning
    cfg = v.config("resized", SourceConfig(name="clips", kind="video", shards=v.retrieval))
    assert (cfg.model.vision.image_size, cfg.model.video.max_frames) == (64, 8)
    torch.manual_seed(3)
    export_weights(build_model(cfg, v.tokenizer).state_dict(), cfg, tmp_path / "ckpt", str(v.root / "tok"))
    with caplog.at_level("INFO", logger="x2vlm"):
        out = evaluate_checkpoint(str(tmp_path / "ckpt"), video_shards=v.retrieval, max_frames=10, image_size=96,
                                  probe_direction=False)
    assert out["image_size"] == 96 and out["video_retrieval"]["protocol"]["max_frames"] == 10
    assert out["video_retrieval"]["protocol"]["image_size"] == 96 and out["video_retrieval"]["pool_size"] == 16
    assert "resized" in caplog.text


class TableModel(torch.nn.Module):
    """Answers the questions it is asked, in order, with the labels of a table."""

    def __init__(self, answers: list, n_answers: int):
        super().__init__()
        self.answers, self.cfg = iter(answers), SimpleNamespace(qa_answers=n_answers)

    def encode_video(self, videos: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(videos), 1, 1)

    def answer_logits(self, vis, ids, atts, index) -> torch.Tensor:
        labels = torch.tensor([next(self.answers) for _ in range(len(ids))])
        return torch.nn.functional.one_hot(labels, self.cfg.qa_answers).float()


def test_accuracy_by_type_and_chance_by_hand():
    def clip(*qa):
        return {"frames": np.zeros((2, 8, 8, 3), np.uint8),
                "json": {"qa": [{"question": f"q{i}", "type": t, "label": label} for i, (t, label) in enumerate(qa)]}}

    clips = [clip(("colour", 0), ("direction", 2)),
             clip(("colour", 1), ("direction", 2), ("colour", -1)),  # the last answer is outside the vocabulary
             clip(("direction", 3))]
    predicted = [0, 2, 1, 3, 1, 3]  # right, right; right, wrong, wrong (never right); right

    def tokenize(texts):
        return torch.ones(len(texts), 3, dtype=torch.long), torch.ones(len(texts), 3, dtype=torch.long)

    r = evaluate_videoqa(TableModel(predicted, 4), clips, tokenize, 8, batch=2)
    assert r["acc"] == pytest.approx(4 / 6) and r["n"] == 6 and r["clips"] == 3 and r["outside_vocab"] == 1
    assert r["by_type"]["colour"]["acc"] == pytest.approx(2 / 3)
    assert r["by_type"]["direction"]["acc"] == pytest.approx(2 / 3)
    # chance: the most frequent answer of each type (colour: 0 or 1, once; direction: 2, twice) for every question
    assert r["chance"] == pytest.approx(3 / 6)
    assert r["by_type"]["colour"]["chance"] == pytest.approx(1 / 3)
    assert r["by_type"]["direction"]["chance"] == pytest.approx(2 / 3)
    assert r["majority"] == pytest.approx(2 / 6)  # always label 2


def test_held_out_sets_with_nothing_usable_are_refused_in_one_line(video_finetuning, tmp_path):
    """Shards that hold nothing the evaluation can use stop it with one line naming what is missing and where,
    from the command line and from the library, instead of a traceback from stacking nothing (or, in training, a
    failure at the first evaluation)."""
    import subprocess
    import sys
    import tarfile

    from x2vlm.config import ConfigError

    v = video_finetuning
    cfg = v.config("empty", SourceConfig(name="clips", kind="video", shards=v.retrieval))
    export_weights(build_model(cfg, v.tokenizer).state_dict(), cfg, tmp_path / "ckpt", str(v.root / "tok"))
    empty = tmp_path / "empty-000000.tar"
    tarfile.open(empty, "w").close()
    images = write_shards(generate("heldout", 3, seed=5, image_size=64), str(tmp_path), "heldout", 3)
    p = subprocess.run([sys.executable, "-m", "x2vlm", "evaluate", "--checkpoint", str(tmp_path / "ckpt"),
                        "--images", str(empty)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip() == (
        "x2vlm evaluate: error: no usable images in 1 shard(s) (empty-000000.tar): nothing to evaluate on"), p.stderr
    for settings, what in ((dict(region_shards=images, min_regions=99), "usable images with at least 99 regions"),
                           (dict(video_shards=images), "usable captioned clips"),
                           (dict(videoqa_shards=v.retrieval), "questions on usable clips")):
        with pytest.raises(ConfigError, match=f"no {what} in "):
            evaluate_checkpoint(str(tmp_path / "ckpt"), fps=1.0, max_frames=4, **settings)
    assert evaluate_checkpoint(str(tmp_path / "ckpt"), image_shards=images)["image_retrieval"]["pool_size"] == 3
