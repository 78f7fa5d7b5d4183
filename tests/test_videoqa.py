"""Video QA end to end on synthetic clips in the MSRVTT-QA format: convert, fine-tune from a pre-trained export
with `x2vlm finetune --task video_qa` (one process), and the held-in accuracy rises over the starting model."""
import json
import os
import subprocess
import sys

import torch

from x2vlm.config import load_config, save_config
from x2vlm.data.shapesworld_video import generate_clips, video_corpus
from x2vlm.data.tokenizer import train_tokenizer
from x2vlm.data.video_formats import videoqa_to_shards
from x2vlm.eval.run import evaluate_checkpoint
from x2vlm.model import X2VLM
from x2vlm.train.checkpoint import export_weights


def test_finetune_video_qa_improves_accuracy(tmp_path):
    clips = generate_clips("train", 16, seed=4)
    videos = tmp_path / "videos"
    videos.mkdir()
    rows = []
    for c in clips:
        (videos / f"{c['key']}.mp4").write_bytes(c["mp4"])
        rows += [{"video_id": c["key"], "question": q["question"], "answer": q["answer"], "type": q["type"]}
                 for q in c["qa"]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    shards = videoqa_to_shards(str(tmp_path / "train.jsonl"), str(videos), str(tmp_path / "qa"), per_shard=8)
    answers = len(json.loads((tmp_path / "qa" / "ans2label.json").read_text()))
    train_tokenizer(video_corpus(clips), str(tmp_path / "tok"))

    cfg = load_config("tiny", [
        "train.stages=[]", f"data.sources=[{{name: qa, kind: video_qa, shards: [{','.join(shards)}], batch_size: 8,"
        " max_frames: 4}]", f"model.qa_answers={answers}", f"model.text.tokenizer={tmp_path / 'tok'}",
        "data.num_workers=1", f"train.out_dir={tmp_path / 'ft'}", "train.steps=40", "train.save_every=40",
        "train.warmup_steps=5", "train.lr=1e-3", "train.precision=fp32", "train.wandb_mode=disabled"])
    save_config(cfg, tmp_path / "ft.yaml")
    from x2vlm.data.tokenizer import load_tokenizer
    tok = load_tokenizer(str(tmp_path / "tok"))
    torch.manual_seed(0)
    pre = X2VLM(cfg.model, cfg.loss, len(tok), tok.pad_token_id)
    state = {k: v for k, v in pre.state_dict().items() if not k.startswith("qa_head.")}  # a pre-training export
    export_weights(state, cfg, tmp_path / "pre", str(tmp_path / "tok"))

    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    p = subprocess.run([sys.executable, "-m", "x2vlm", "finetune", "--task", "video_qa", "--config",
                        str(tmp_path / "ft.yaml"), "--checkpoint", str(tmp_path / "pre")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    after = evaluate_checkpoint(str(tmp_path / "ft"), videoqa_shards=shards, max_frames=4)["video_qa"]
    assert after["n"] == len(rows) and set(after["by_type"]) >= {"colour", "direction"}
    # before: the pre-trained weights with a fresh answer head, as the fine-tuning began
    from video.shards import iterate_video_samples
    from x2vlm.eval.run import make_tokenize
    from x2vlm.eval.videoqa import evaluate_videoqa
    from x2vlm.train.checkpoint import load_weights

    torch.manual_seed(1)
    start = X2VLM(cfg.model, cfg.loss, len(tok), tok.pad_token_id)
    load_weights(start, tmp_path / "pre")
    before = evaluate_videoqa(start, iterate_video_samples(shards, max_frames=4), make_tokenize(tok, 40), 64)
    assert before["n"] == after["n"]
    assert after["acc"] > before["acc"] + 0.1 and after["acc"] > 2 * after["chance"], (before, after)
