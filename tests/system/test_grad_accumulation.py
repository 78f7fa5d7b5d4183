"""Gradient accumulation through the DeepSpeed engine (one process, fp32): two micro-batches of B/2 give the
gradient of one batch of B when the losses are means over equal shares (MLM, box); the contrastive loss instead
gives the mean of the two micro-batches' own losses, each over its own B/2 in-batch negatives, which is not the
loss over B (what differs: a row meets fewer negatives)."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    import deepspeed, torch
    from x2vlm import distributed
    from x2vlm.config import load_config, update
    from x2vlm.model import X2VLM
    from x2vlm.objectives import Pretraining
    from x2vlm.train.plan import synthetic_batch

    distributed.init()
    itc = float(sys.argv[1])
    cfg = update(load_config("tiny"), {"loss.itc": itc, "loss.itm": 0.0, "train.precision": "fp32"})
    objective = Pretraining(cfg.loss)
    batch = synthetic_batch(cfg, "region", 4, 3, 1, 100, torch.Generator().manual_seed(1))  # 4 images, 3 texts each

    def part(images):
        rows = torch.cat([torch.nonzero(batch["image_idx"] == i)[:, 0] for i in images])
        out = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v) and k != "images"}
        out["image_idx"] = torch.arange(len(images)).repeat_interleave(3)
        out["images"] = batch["images"][images]
        return {**out, "keys": [str(i) for i in images], "skipped": {}}

    def model():
        torch.manual_seed(0)
        return X2VLM(cfg.model, vocab_size=100, pad_id=0)

    def engine_grads(batches):
        ds = {"train_micro_batch_size_per_gpu": len(batches[0]["keys"]), "gradient_accumulation_steps": len(batches),
              "zero_optimization": {"stage": 0}, "zero_allow_untested_optimizer": True}
        m = model()
        engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0), config=ds)
        for b in batches:
            torch.manual_seed(5)  # the hard negatives draw the same numbers in every run
            engine.backward(engine(b, objective)["loss"])
        return {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}

    def plain_grads(batches):  # the mean of the micro-batches' own losses, without the engine
        m = model()
        total = 0
        for b in batches:
            torch.manual_seed(5)
            total = total + m(b, objective)["loss"] / len(batches)
        total.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    whole, halves = [batch], [part([0, 1]), part([2, 3])]
    got = {"accumulated": engine_grads(halves), "whole": engine_grads(whole), "mean_of_halves": plain_grads(halves)}
    def differ(a, b):  # relative to the largest gradient (some, e.g. key biases, are 0 up to rounding)
        return max(float((a[n] - b[n]).abs().max()) for n in b) / max(float(b[n].abs().max()) for n in b)
    print(json.dumps({"accumulated_vs_whole": differ(got["accumulated"], got["whole"]),
                      "accumulated_vs_mean_of_halves": differ(got["accumulated"], got["mean_of_halves"]),
                      "same_parameters": set(got["accumulated"]) == set(got["whole"])}))
""")


@pytest.fixture(scope="module")
def run(single_process_env):
    def measure(itc: float) -> dict:
        p = subprocess.run([sys.executable, "-c", SCRIPT, str(itc)], env=single_process_env(), capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])
    return measure


def test_two_half_batches_give_the_update_of_the_whole_batch(run):
    r = run(0.0)  # MLM and box losses: means over equal shares of the batch
    assert r["same_parameters"] and r["accumulated_vs_whole"] < 1e-5, r


def test_the_contrastive_loss_is_the_mean_of_the_micro_batches_own(run):
    r = run(1.0)
    assert r["accumulated_vs_mean_of_halves"] < 1e-5, r
    assert r["accumulated_vs_whole"] > 1e-3, r  # fewer in-batch negatives: another loss
