"""A non-finite loss or gradient skips the step on every rank, is counted, and after train.max_bad_steps in a row
stops the run; checkpoints stay intact (a skipped step changes no weight). One process (the ranks agree through
one all-reduce of a flag, and DeepSpeed's gradient norm is global)."""
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data
from x2vlm.train.state import NonFiniteLoss, StepGuard

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from x2vlm.config import load_config
    from x2vlm.model import X2VLM
    from x2vlm.train.loop import train

    bad_loss = {int(s) for s in sys.argv[2].split(",") if s}
    bad_grad = {int(s) for s in sys.argv[3].split(",") if s}
    forward, calls = X2VLM.forward, [0]

    def poisoned(self, batch, objective):  # two sources: calls 2k and 2k + 1 make step k + 1
        out = forward(self, batch, objective)
        calls[0] += 1
        step = (calls[0] + 1) // 2
        if step in bad_loss:
            out["loss"] = out["loss"] * float("nan")
        if step in bad_grad:  # a finite loss (sqrt(0) = 0) whose gradient is not: d sqrt(u)/du at 0 is inf
            z = next(self.parameters()).flatten()[0] * 0
            out["loss"] = out["loss"] + torch.sqrt(z * z)
        return out

    X2VLM.forward = poisoned
    train(load_config(sys.argv[1]))
""")


def test_guard_counts_and_stops():
    guard = StepGuard(limit=2)
    assert StepGuard.finite(torch.tensor(1.0)) and not StepGuard.finite(torch.tensor(float("inf")))
    assert not StepGuard.finite(torch.tensor([1.0, float("nan")]))
    guard.record(True, 0)
    guard.record(False, 1)
    guard.record(True, 2)
    assert guard.skipped == 1 and guard.consecutive == 0
    guard.record(False, 3)
    with pytest.raises(NonFiniteLoss, match="2 consecutive"):
        guard.record(False, 4)


def test_non_finite_steps_are_skipped_then_the_run_stops(tmp_path, single_process_env):
    paths = prepare_data(tmp_path, n_train=64, n_heldout=4, seed=2, image_size=64, shards_per_source=1)
    cfg = update(load_config("tiny"), {
        "train.stages": [], "data.sources": [
            SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=4),
            SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=4)],
        "data.num_workers": 0, "model.text.tokenizer": str(tmp_path / "tokenizer"),
        "train.out_dir": str(tmp_path / "run"), "train.steps": 8, "train.save_every": 2, "train.max_bad_steps": 3,
        "train.precision": "fp32", "train.wandb_mode": "disabled", "train.log_every": 1})
    save_config(cfg, tmp_path / "c.yaml")
    env = single_process_env()
    # step 3's loss is bad (skipped, counted); 5 (gradient), 6 and 7 (loss) are bad in a row: the run stops at 7
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "c.yaml"), "3,6,7", "5"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "3 consecutive steps" in p.stderr, p.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 2, 3]
    # a step whose loss is not finite logs no loss (the window's means leave it out); step 5's loss was finite
    assert [r["step"] for r in rows if "loss" not in r] == [3, 6]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["images/itc"]) for r in rows if "loss" in r)
    ckpts = tmp_path / "run" / "checkpoints"
    # saved every 2 steps: after the skipped steps 5 and 6 the weights are still those of step 4, untouched
    assert (ckpts / "latest").read_text() == "step6"
    from safetensors.torch import load_file
    four = load_file(str(ckpts / "step4" / "model.safetensors"))
    six = load_file(str(ckpts / "step6" / "model.safetensors"))
    assert all(torch.equal(four[k], six[k]) for k in four)  # the bad gradient of step 5 changed nothing
    two = load_file(str(ckpts / "step2" / "model.safetensors"))
    assert any(not torch.equal(two[k], four[k]) for k in two)  # step 4 itself was a real step
