"""The checks that need a GPU, in one run of a few minutes (`bash scripts/gpu_check.sh`):

1. kernels: the Triton box pooling and contrastive kernels against the plain references, forward and backward, in
   fp32 and bf16, and their times against the PyTorch paths ("chunked"/"cpu") and the references, at the
   benchmark shapes and at batch 65,536 for the contrastive loss;
2. training: a few steps of the base preset (random weights, synthetic data) under the deepspeed launcher with
   NCCL: bf16 with ZeRO-2 and ZeRO-3, fp16 (dynamic loss scaling) with ZeRO-2, on 1 GPU and on 2 when there are;
   each with logged steps, a checkpoint and a resume from it; samples, images, region texts and clips per second,
   MFU and the other logged numbers.

Prints a line per check and, as its last line, one JSON object. `--allow-cpu --preset tiny` runs the same
orchestration on CPU ranks (gloo, no Triton) to check the script itself.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn, reps: int, sync) -> float:
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def contrastive_step(impl, i, t, temp, ids, itc_loss, contrastive_loss):
    """Forward + backward of the contrastive loss with one implementation; returns the loss."""
    def step():
        i.grad = t.grad = temp.grad = None
        loss = itc_loss(i, t, temp, ids)[0] if impl == "reference" else \
            contrastive_loss(i, t, temp, ids, impl=impl).loss
        loss.backward()
        return loss
    return step


def box_pool_step(impl, feats, boxes, image_idx, grid, weight, box_pool):
    """Forward + backward of box pooling with one implementation; returns the pooled tokens."""
    def step():
        feats.grad = None
        pooled = box_pool(feats, boxes, image_idx, grid, impl=impl)
        (pooled.float() * weight.float()).sum().backward()
        return pooled
    return step


def kernels(device: str, reps: int) -> dict:
    """Triton against the references and the PyTorch paths: max differences and median times."""
    import torch
    import torch.nn.functional as F

    from x2vlm.ops import box_pool, contrastive_loss, itc_loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    impls = ["triton", "chunked"] if device == "cuda" else ["chunked"]
    out: dict = {"contrastive": {}, "box_pool": {}}
    for batch in (4096, 16384, 65536) if device == "cuda" else (512,):
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(0)
            img = F.normalize(torch.randn(batch, 256, generator=g), dim=-1).to(device, dtype)
            txt = F.normalize(torch.randn(batch, 256, generator=g), dim=-1).to(device, dtype)
            ids = torch.arange(batch, device=device) // 2  # two texts per image
            res, grads = {}, {}
            for impl in ["reference", *impls]:
                i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
                temp = torch.tensor([0.07], device=device, requires_grad=True)
                step = contrastive_step(impl, i, t, temp, ids, itc_loss, contrastive_loss)
                try:
                    loss = step()
                    grads[impl] = (float(loss.detach()), i.grad.float(), t.grad.float(), temp.grad.float())
                    res[impl] = {"ms": round(1000 * timed(step, reps, sync), 3)}
                except (RuntimeError, MemoryError) as e:  # the reference's B x B logits at 65,536
                    res[impl] = {"error": str(e).splitlines()[0][:120]}
                if device == "cuda":
                    torch.cuda.empty_cache()
            ref = grads.get("reference")
            for impl in impls:
                if ref is not None and impl in grads:
                    res[impl]["max_abs_diff"] = max(abs(grads[impl][0] - ref[0]),
                                                    *(float((a - b).abs().max()) for a, b in zip(grads[impl][1:],
                                                                                              ref[1:])))
            out["contrastive"][f"{batch}/{str(dtype)[6:]}"] = res
            print(f"[gpu-check] contrastive B={batch} {dtype}: {json.dumps(res)}", flush=True)
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(1)
        n, grid, dim, m = 64, 14, 768, 320
        feats = torch.randn(n, grid * grid, dim, generator=g).to(device, dtype)
        c0, r0 = torch.randint(0, grid, (m,), generator=g), torch.randint(0, grid, (m,), generator=g)
        c1 = torch.minimum(c0 + 1 + torch.randint(0, grid, (m,), generator=g), torch.tensor(grid))
        r1 = torch.minimum(r0 + 1 + torch.randint(0, grid, (m,), generator=g), torch.tensor(grid))
        boxes = torch.stack([c0, r0, c1, r1], 1).to(device)
        image_idx = (torch.arange(m) % n).to(device)
        weight = torch.randn(m, dim, generator=g).to(device, dtype)
        res, grads = {}, {}
        for impl in ["reference", "triton" if device == "cuda" else "cpu", "cpu"]:
            f = feats.clone().requires_grad_()
            step = box_pool_step(impl, f, boxes, image_idx, grid, weight, box_pool)
            pooled = step()
            grads[impl] = (pooled.float(), f.grad.float())
            res[impl] = {"ms": round(1000 * timed(step, reps, sync), 3)}
        for impl in res:
            if impl != "reference":
                res[impl]["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(grads[impl],
                                                                                         grads["reference"]))
        out["box_pool"][str(dtype)[6:]] = res
        print(f"[gpu-check] box pooling {dtype}: {json.dumps(res)}", flush=True)
    return out


def training(device: str, preset: str, work: Path, steps: int) -> dict:
    """A few steps per (precision, ZeRO stage, GPUs) with a checkpoint and a resume from it."""
    from x2vlm.config import load_config, save_config, update
    from x2vlm.demo.run import prepare_data
    from x2vlm.launch import command, environment

    size = load_config(preset).model.vision.image_size
    paths = prepare_data(work, n_train=256, n_heldout=8, seed=0, image_size=min(size, 224), shards_per_source=8)
    gpus = [1, 2] if device == "cuda" and __import__("torch").cuda.device_count() >= 2 else [1]
    runs = [("bf16", 2), ("bf16", 3)] + ([("fp16", 2)] if device == "cuda" else [])
    base = load_config(preset)
    sources = [dataclasses.replace(src, shards=paths["train"]) for src in base.data.sources
               if src.kind in ("image", "region")]
    results = {}
    for n in gpus:
        for precision, zero in runs:
            name = f"{precision}-zero{zero}-{n}gpu"
            out = work / name
            cfg = update(base, {
                "train.stages": [], "data.sources": sources, "model.text.tokenizer": str(work / "tokenizer"),
                "train.steps": steps, "train.save_every": steps // 2, "train.log_every": 1, "train.warmup_steps": 1,
                "train.ds_config": f"zero{zero}_{precision}.json", "train.precision": precision,
                "train.out_dir": str(out), "train.wandb_mode": "disabled", "data.num_workers": 2})
            save_config(cfg, work / f"{name}.yaml")
            t0 = time.time()
            first = subprocess.run(command(["pretrain", "--config", work / f"{name}.yaml"], n), env=environment(),
                                   capture_output=True, text=True)
            again = None
            if first.returncode == 0:  # the second half again, from the checkpoint in its middle
                (out / "checkpoints" / "latest").write_text(f"step{steps // 2}")
                again = subprocess.run(command(["pretrain", "--config", work / f"{name}.yaml", "--resume", "latest"],
                                               n), env=environment(), capture_output=True, text=True)
            entry = {"seconds": round(time.time() - t0, 1), "ok": again is not None and again.returncode == 0}
            if not entry["ok"]:
                bad = again if again is not None else first
                entry["error"] = (bad.stdout + bad.stderr)[-1500:]
            else:
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                entry["resumed"] = f"resumed from step{steps // 2}" in again.stdout + again.stderr
                last = rows[-1]
                entry.update({k: v for k, v in last.items() if k.endswith("_per_s") or k.startswith("memory/")
                              or k in ("loss", "tflops_per_device", "mfu_pct", "hfu_pct", "loss_scale",
                                       "overflow_steps", "data_load_pct", "step_time_s")})
            results[name] = entry
            shown = {k: v for k, v in entry.items() if k != "error"}
            print(f"[gpu-check] {name}: {json.dumps(shown)}" + (f"\n{entry['error']}" if "error" in entry else ""),
                  flush=True)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--allow-cpu", action="store_true", help="run on CPU ranks when there is no GPU (a dry run)")
    ap.add_argument("--skip", choices=("kernels", "training"), action="append", default=[])
    args = ap.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.allow_cpu:
        print("gpu_check: no GPU here (use --allow-cpu --preset tiny for a dry run on CPU ranks)", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("WANDB_MODE", "disabled")
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "gpus": torch.cuda.device_count() if device == "cuda" else 0, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    if "kernels" not in args.skip:
        report["kernels"] = kernels(device, args.reps)
    if "training" not in args.skip:
        with tempfile.TemporaryDirectory() as tmp:
            report["training"] = training(device, args.preset, Path(tmp), args.steps)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
