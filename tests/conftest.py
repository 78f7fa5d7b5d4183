"""Test-wide settings: one torch thread per test process (tiny models on a loaded 2-core machine run far faster
single-threaded than with threads competing for the cores), and no wandb traffic."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def video_finetuning(tmp_path_factory):
    """What a video fine-tuning test starts from: 16 training clips (and 4 held-out clips as a test split) written
    in the published formats, the training split converted to retrieval and QA shards, a tokenizer trained on
    their texts, a pre-trained export (a freshly initialised tiny model without QA head), and helpers to write a
    fine-tuning config and to run `x2vlm finetune` (one process)."""
    import json
    import subprocess
    import sys
    from types import SimpleNamespace

    from x2vlm.config import load_config, save_config
    from x2vlm.data.shapesworld_video import generate_clips, video_corpus, write_published_formats
    from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer
    from x2vlm.data.video_formats import retrieval_to_shards, videoqa_to_shards
    from x2vlm.model import X2VLM
    from x2vlm.train.checkpoint import export_weights

    root = tmp_path_factory.mktemp("video_finetuning")
    clips, test_clips = generate_clips("train", 16, seed=4), generate_clips("heldout", 4, seed=4)
    files = write_published_formats({"train": clips, "test": test_clips}, root / "published")
    retrieval = retrieval_to_shards(files["retrieval"]["train"], files["videos"], str(root / "retrieval"), "train", 8)
    qa = videoqa_to_shards(files["qa"]["train"], files["videos"], str(root / "qa"), "train", 8)
    answers = len(json.loads((root / "qa" / "ans2label.json").read_text()))
    train_tokenizer(video_corpus(clips), str(root / "tok"))
    tokenizer = load_tokenizer(str(root / "tok"))

    def config(name: str, source: str, *overrides: str):
        """The tiny preset with one data source, fine-tuning settings and overrides, saved as ROOT/NAME.yaml."""
        cfg = load_config("tiny", [
            "train.stages=[]", f"data.sources=[{source}]", f"model.text.tokenizer={root / 'tok'}",
            "data.num_workers=1", f"train.out_dir={root / name}", "train.warmup_steps=5", "train.lr=1e-3",
            "train.precision=fp32", "train.wandb_mode=disabled", *overrides])
        save_config(cfg, root / f"{name}.yaml")
        return cfg

    base = config("pre", f"{{name: qa, kind: video_qa, shards: [{','.join(qa)}]}}")
    torch.manual_seed(0)
    pre = X2VLM(base.model, base.loss, len(tokenizer), tokenizer.pad_token_id)
    export_weights(pre.state_dict(), base, root / "pre", str(root / "tok"))

    def finetune(task: str, name: str) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
        p = subprocess.run([sys.executable, "-m", "x2vlm", "finetune", "--task", task, "--config",
                            str(root / f"{name}.yaml"), "--checkpoint", str(root / "pre")], env=env,
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    return SimpleNamespace(root=root, clips=clips, test_clips=test_clips, files=files, retrieval=retrieval, qa=qa,
                           answers=answers, tokenizer=tokenizer, config=config, finetune=finetune)
