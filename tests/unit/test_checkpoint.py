"""Checkpoints are atomic (a crash while saving leaves `latest` on the previous, loadable checkpoint), old ones
are pruned by train.keep_last, and registered parts are saved per rank. DeepSpeed's part is stood in for by an
engine that writes a file (and can die half-way); the 2-rank runs in tests/system save and resume through
DeepSpeed."""
import json
from pathlib import Path

import pytest
import torch

from x2vlm.config import load_config
from x2vlm.pretrained import find_export, weights_sha256
from x2vlm.train import checkpoint, reshard


class Engine:
    """What checkpoint.save needs of a DeepSpeed engine; `die_after_files` simulates a crash mid-save."""

    def __init__(self):
        torch.manual_seed(0)
        self.module = torch.nn.Linear(3, 2)
        self.die = False

    def zero_optimization_stage(self):
        return 2

    def save_checkpoint(self, root, tag, client_state, save_latest):
        assert not save_latest  # `latest` is ours to move, after the checkpoint is complete
        folder = Path(root) / tag
        folder.mkdir(parents=True)
        torch.save({"step": client_state["step"]}, folder / "mp_rank_00_model_states.pt")
        if self.die:
            raise KeyboardInterrupt("killed while saving")


class Counter:
    """A registered part."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def saver(tmp_path, keep_last, engine):
    cfg = load_config("tiny", [f"train.out_dir={tmp_path}", f"train.keep_last={keep_last}"])
    ckpt = checkpoint.Checkpointer(engine, cfg, {"world_size": 1, "num_workers": 1})
    return cfg, ckpt


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path):
    engine = Engine()
    cfg, ckpt = saver(tmp_path, 0, engine)
    part = Counter()
    ckpt.register("counter", part)
    part.n = 7
    ckpt.save(10, {"stage": "main"})
    root = checkpoint.checkpoint_dir(cfg)
    assert (root / "latest").read_text() == "step10" and checkpoint.step_of(cfg, "latest") == 10
    with torch.no_grad():
        engine.module.weight.add_(1.0)
    engine.die = True
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(20, {"stage": "main"})
    assert (root / "step20.partial").is_dir() and not (root / "step20").exists()
    assert (root / "latest").read_text() == "step10"
    assert find_export(cfg.train.out_dir) == root / "step10"  # what loads is the complete one
    engine.die = False
    ckpt.save(20, {"stage": "main"})
    assert not (root / "step20.partial").exists() and (root / "latest").read_text() == "step20"
    state = checkpoint.read_state(root / "step20")
    assert state == {"step": 20, "world_size": 1, "num_workers": 1, "stage": "main"}
    assert json.loads((root / "step10" / "rank0.json").read_text()) == {"counter": {"n": 7}}
    assert weights_sha256(root / "step20") != weights_sha256(root / "step10")


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg, ckpt = saver(tmp_path, 2, Engine())
    for step in (5, 10, 15, 20):
        ckpt.save(step, {})
    root = checkpoint.checkpoint_dir(cfg)
    assert checkpoint.checkpoint_steps(root) == [15, 20]
    assert checkpoint.step_of(cfg, "latest") == 20


class Payload:
    """Unpickling this runs code (it would create a file): what a weights-only loader must refuse."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_deepspeed_files_load_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    engine = Engine()
    engine.checkpoint_engine, engine._config = TorchCheckpointEngine(None), None
    reshard.load_weights_only(engine)
    loader = engine.checkpoint_engine
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "ok.pt")
    assert loader.load(str(tmp_path / "ok.pt"))["step"] == 3
    torch.save({"w": Payload(tmp_path / "pwned")}, tmp_path / "bad.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        loader.load(str(tmp_path / "bad.pt"))
    assert not (tmp_path / "pwned").exists()
