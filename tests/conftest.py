"""Test-wide settings and shared helpers.

Layout: tests/unit (one process, seconds each) and tests/system (several processes: gloo ranks, the deepspeed
launcher, training runs). Tests marked `full` (real-size runs, long benchmarks) run only with `--full`.
Settings: one torch thread per test process (tiny models on a loaded 2-core machine run far faster single-threaded
than with threads competing for the cores), and no wandb traffic."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="also run the slow tests marked `full`")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: slow (real-size runs, long benchmarks); run with --full")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason="slow: run with --full")
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def x2vlm_logger_fresh():
    """Every test starts with the "x2vlm" logger as a fresh process has it: no console handler, propagating to the
    root logger where pytest's log capture listens. A command run in-process (even from a module-scoped fixture,
    which is set up before this fixture) sets up its console logging and stops the propagation; pytest before 9
    does not capture a logger that stops propagating."""
    import logging

    def reset():
        log = logging.getLogger("x2vlm")
        log.handlers[:] = [h for h in log.handlers if not getattr(h, "_x2vlm", False)]
        log.setLevel(logging.NOTSET)
        log.propagate, log.disabled = True, False

    reset()
    yield
    reset()


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def run_triton_interpreted():
    """run(test_file): the file's `test_triton_*` cases again in a child pytest with TRITON_INTERPRET=1 (Triton
    kernels run on CPU tensors only then, and the variable must be set before triton is first imported)."""
    def run(test_file: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_triton_",
                            test_file], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and " passed" in p.stdout, p.stdout[-4000:] + p.stderr[-2000:]
    return run


@pytest.fixture(scope="session")
def two_stage_config():
    """config(out, paths, steps, **values): the tiny model on the demo-style data at `paths` (from prepare_data in
    `out`), in fp32, images + regions for steps[0] steps, then with video for steps[1]; batches of 4 images, 3
    region images and 3 clips of up to 3 frames (a 4-frame embedding); `values` override or add settings."""
    from x2vlm.config import SourceConfig, StageConfig, load_config, update

    def config(out, paths, steps, **values):
        video_lr = values.pop("video_lr", 0.0)  # 0: train.lr
        return update(load_config("tiny"), {
            "data.sources": [SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=4),
                             SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=3),
                             SourceConfig(name="videos", kind="video", shards=paths["train_video"], batch_size=3,
                                          max_frames=3)],
            "train.stages": [StageConfig(name="images", steps=steps[0], sources=["images", "regions"]),
                             StageConfig(name="video", steps=steps[1], sources=["images", "regions", "videos"],
                                         lr=video_lr)],
            "train.steps": sum(steps), "train.log_every": 1, "train.precision": "fp32", "data.num_workers": 1,
            "train.wandb_mode": "disabled", "model.video.max_frames": 4,
            "model.text.tokenizer": str(out / "tokenizer"), **values})
    return config


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **extra}


@pytest.fixture(scope="session")
def launch():
    """launch(config_path, *extra, ranks=2, command_name="pretrain", env=None) -> the run's output: `x2vlm
    COMMAND --config ...` under the deepspeed launcher (environment variables `env` added), which must succeed."""
    from x2vlm.launch import command

    def run(config_path, *extra, ranks: int = 2, command_name: str = "pretrain", env: dict | None = None) -> str:
        args = [command_name, "--config", str(config_path), *map(str, extra)]
        p = subprocess.run(command(args, ranks), env=_env(**(env or {})), capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        return p.stdout + p.stderr
    return run


@pytest.fixture(scope="session")
def start_launch():
    """start(config_path, *extra, ranks=2) -> Popen of `x2vlm pretrain` under the deepspeed launcher in a process
    group of its own (so that a test can kill every process of the launch), output discarded."""
    from x2vlm.launch import command

    def start(config_path, *extra, ranks: int = 2) -> subprocess.Popen:
        args = ["pretrain", "--config", str(config_path), *map(str, extra)]
        return subprocess.Popen(command(args, ranks), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    return start


@pytest.fixture(scope="session")
def single_process_env():
    """The environment of a one-process run (what a launcher would set), with a free port."""
    from x2vlm.distributed import free_port

    def env() -> dict:
        return _env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return env


@pytest.fixture(scope="session")
def video_finetuning(tmp_path_factory):
    """What a video fine-tuning test starts from: 16 training clips (and 4 held-out clips as a test split) written
    in the published formats, the training split converted to retrieval and QA shards, a tokenizer trained on
    their texts, a pre-trained export (a freshly initialised tiny model without QA head), and helpers to write a
    fine-tuning config and to run `x2vlm finetune` (one process)."""
    import json
    from types import SimpleNamespace

    from x2vlm.config import SourceConfig, load_config, save_config, update
    from x2vlm.data.formats.video import retrieval_to_shards, videoqa_to_shards
    from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer
    from x2vlm.demo.shapesworld_video import generate_clips, video_corpus, write_published_formats
    from x2vlm.pretrained import build_model, export_weights

    root = tmp_path_factory.mktemp("video_finetuning")
    clips, test_clips = generate_clips("train", 16, seed=4), generate_clips("heldout", 4, seed=4)
    files = write_published_formats({"train": clips, "test": test_clips}, root / "published")
    retrieval = retrieval_to_shards(files["retrieval"]["train"], files["videos"], str(root / "retrieval"), "train", 8)
    qa = videoqa_to_shards(files["qa"]["train"], files["videos"], str(root / "qa"), "train", 8)
    answers = len(json.loads((root / "qa" / "ans2label.json").read_text()))
    train_tokenizer(video_corpus(clips), str(root / "tok"))
    tokenizer = load_tokenizer(str(root / "tok"))

    def config(name: str, source: SourceConfig, **values):
        """The tiny preset with one data source, fine-tuning settings and `values` (dotted keys), saved as
        ROOT/NAME.yaml."""
        cfg = update(load_config("tiny"), {
            "train.stages": [], "data.sources": [source], "model.text.tokenizer": str(root / "tok"),
            "data.num_workers": 1, "train.out_dir": str(root / name), "train.warmup_steps": 5, "train.lr": 1e-3,
            "train.precision": "fp32", "train.wandb_mode": "disabled", **values})
        save_config(cfg, root / f"{name}.yaml")
        return cfg

    base = config("pre", SourceConfig(name="qa", kind="video_qa", shards=qa))
    torch.manual_seed(0)
    export_weights(build_model(base, tokenizer).state_dict(), base, root / "pre", str(root / "tok"))

    def finetune(task: str, name: str) -> None:
        p = subprocess.run([sys.executable, "-m", "x2vlm", "finetune", "--task", task, "--config",
                            str(root / f"{name}.yaml"), "--checkpoint", str(root / "pre")], env=_env(),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    return SimpleNamespace(root=Path(root), clips=clips, test_clips=test_clips, files=files, retrieval=retrieval,
                           qa=qa, answers=answers, tokenizer=tokenizer, config=config, finetune=finetune)
