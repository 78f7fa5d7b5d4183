"""Benchmark the fused ops against their reference definitions: time and peak memory, forward + backward.

    python scripts/bench_ops.py [--quick] [--device cpu|cuda] [--reps 3] [--threads 1]

Contrastive loss (float32, one process): the tiled loss (`contrastive_loss`, "chunked" on CPU, "auto" on CUDA,
hard-negative draws included) against the naive reference `itc_loss` (full B x N logits, no sampling) at batch
16,384 and, for the tiled loss, 65,536, where the naive one is also tried under a memory budget. Box pooling:
N=64 images of 14 x 14 patches, D=768, M=320 boxes; "cpu"/"auto" against the gather + masked-mean reference.

Times are medians over --reps repetitions. Peak memory:
- CPU: every measurement runs in a fresh child process; peak = the process's maximum resident set size
  (getrusage ru_maxrss) at the end minus its resident set size after a tiny warm-up run (libraries loaded) and
  making the inputs; gradients of the inputs count as the op's memory. A budgeted run also
  caps the child's address space (RLIMIT_AS) at its size after setup + the budget, so an allocation past it
  fails, which is reported as "oom".
- CUDA: torch.cuda.max_memory_allocated minus the memory allocated after setup, in this process.
What stays allocated after the step (mostly the inputs' gradients, which every implementation must produce) is
also reported ("kept"); peak - kept is the step's working memory.
Prints a table, then as its last line one JSON object with the ratios.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def unit_rows(torch, n: int, dim: int, device: str, seed: int):
    """[n, dim] float32 L2-normalised rows, made without a second full-size temporary."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)).to(device)
    return x.div_(x.norm(dim=1, keepdim=True)).requires_grad_()


def make_work(torch, spec: dict):
    """The inputs and a closure running forward + backward once, for one measurement `spec`."""
    device = spec["device"]
    if spec["op"] == "contrastive":
        from x2vlm.ops import contrastive_loss, itc_loss

        img = unit_rows(torch, spec["batch"], spec["dim"], device, 0)
        txt = unit_rows(torch, spec["batch"], spec["dim"], device, 1)
        temp = torch.tensor(0.07, device=device, requires_grad=True)

        def work():
            img.grad = txt.grad = temp.grad = None
            if spec["impl"] == "naive":
                loss = itc_loss(img, txt, temp)[0]
            else:
                loss = contrastive_loss(img, txt, temp, impl=spec["impl"]).loss
            loss.backward()
        return work

    from x2vlm.ops import box_pool

    n, grid, dim, m = spec["images"], spec["grid"], spec["dim"], spec["boxes"]
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, grid * grid, dim, generator=g).to(device).requires_grad_()
    c0, r0 = torch.randint(0, grid, (m,), generator=g), torch.randint(0, grid, (m,), generator=g)
    c1 = torch.minimum(c0 + 1 + torch.randint(0, grid, (m,), generator=g), torch.tensor(grid))
    r1 = torch.minimum(r0 + 1 + torch.randint(0, grid, (m,), generator=g), torch.tensor(grid))
    boxes = torch.stack([c0, r0, c1, r1], 1).to(device)
    image_idx = (torch.arange(m) % n).to(device)  # several boxes per image
    weight = torch.randn(m, dim, generator=g).to(device)

    def work():
        feats.grad = None
        (box_pool(feats, boxes, image_idx, grid, impl=spec["impl"]) * weight).sum().backward()
    return work


def measure(spec: dict) -> dict:
    """Run one measurement here: {"times": [s, ...], "peak_mb": float} or {"oom": message}."""
    import torch

    torch.set_num_threads(spec["threads"])
    cuda = spec["device"] == "cuda"
    # Warm up on a tiny case first, so that loading libraries and code is not counted as the op's memory.
    make_work(torch, {**spec, "batch": 64, "images": 2, "boxes": 4})()
    work = make_work(torch, spec)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
        if spec.get("budget_mb"):
            limit = vm_bytes() + int(spec["budget_mb"] * 2**20)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    times = []
    try:
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            work()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except (RuntimeError, MemoryError) as e:  # CPU allocator failure or torch.cuda.OutOfMemoryError
        return {"oom": str(e).splitlines()[0][:160]}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        kept = torch.cuda.memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS shows what is still held
        kept = rss_bytes() - base
    return {"times": times, "peak_mb": peak / 2**20, "kept_mb": kept / 2**20}


def run(spec: dict) -> dict:
    """Measure in a fresh child process on CPU (honest peak RSS), in this process on CUDA."""
    if spec["device"] == "cuda":
        return measure(spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    child = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                           text=True)
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        # Killed (e.g. by the kernel's out-of-memory killer) or failed outside the measured region.
        return {"oom": f"child exited {child.returncode}: {child.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def row(name: str, result: dict) -> str:
    if "oom" in result:
        return f"{name:<44} {'oom':>10} {'':>12} {'':>10}   {result['oom'][:70]}"
    return (f"{name:<44} {statistics.median(result['times']):>10.3f} {result['peak_mb']:>12.1f}"
            f" {result['kept_mb']:>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--budget-gb", type=float, default=12.0,
                    help="memory budget of the naive loss at the large batch (CPU: address-space limit)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    cuda = args.device == "cuda"
    tiled_impl, fast_impl = ("auto", "auto") if cuda else ("chunked", "cpu")
    batch, large, dim = (2048, 8192, 256) if args.quick else (16384, 65536, 256)
    box = (dict(images=8, grid=14, dim=128, boxes=40) if args.quick
           else dict(images=64, grid=14, dim=768, boxes=320))
    budget_mb = (0.5 if args.quick else args.budget_gb) * 1024
    common = dict(device=args.device, threads=args.threads)
    contrastive = dict(op="contrastive", dim=dim, **common)
    big_reps = 1  # the large batch is slow on CPU: one repetition

    print(f"device={args.device} threads={args.threads} reps={args.reps}; memory: "
          + ("torch.cuda.max_memory_allocated" if cuda else "child process ru_maxrss - RSS after setup"))
    print(f"{'case':<44} {'time_s':>10} {'peak_mb':>12} {'kept_mb':>10}")
    res = {}
    cases = [("naive", dict(contrastive, impl="naive", batch=batch, reps=args.reps)),
             ("tiled", dict(contrastive, impl=tiled_impl, batch=batch, reps=args.reps)),
             ("tiled_large", dict(contrastive, impl=tiled_impl, batch=large, reps=big_reps)),
             ("naive_large", dict(contrastive, impl="naive", batch=large, reps=big_reps, budget_mb=budget_mb)),
             ("box_ref", dict(op="box_pool", impl="reference", reps=max(args.reps, 5), **box, **common)),
             ("box_fast", dict(op="box_pool", impl=fast_impl, reps=max(args.reps, 5), **box, **common))]
    for name, spec in cases:
        res[name] = run(spec)
        label = f"{spec['op']} {spec['impl']}" + (f" B={spec['batch']}" if "batch" in spec else "")
        if spec.get("budget_mb"):
            label += f" (budget {spec['budget_mb'] / 1024:g} GiB)"
        print(row(label, res[name]), flush=True)

    def med(name):
        return statistics.median(res[name]["times"])

    def ratio(a, b, f):
        return round(f(a) / f(b), 3) if "oom" not in res[a] and "oom" not in res[b] else None

    naive_large = res["naive_large"]
    summary = {
        "contrastive": {
            "batch": batch, "dim": dim,
            "memory_ratio": ratio("naive", "tiled", lambda n: res[n]["peak_mb"]),
            "time_ratio": ratio("tiled", "naive", med),
            "naive_peak_mb": res["naive"].get("peak_mb"), "tiled_peak_mb": res["tiled"].get("peak_mb"),
            "naive_time_s": med("naive") if "times" in res["naive"] else None,
            "tiled_time_s": med("tiled") if "times" in res["tiled"] else None,
            "large_batch": {"batch": large, "tiled_peak_mb": res["tiled_large"].get("peak_mb"),
                            "naive": "oom" if "oom" in naive_large else round(naive_large["peak_mb"], 1),
                            "naive_budget_mb": budget_mb},
        },
        "box_pool": {
            "speedup": ratio("box_ref", "box_fast", med),
            "memory_ratio": ratio("box_ref", "box_fast", lambda n: res[n]["peak_mb"]),
            "working_memory_ratio": ratio("box_ref", "box_fast", lambda n: res[n]["peak_mb"] - res[n]["kept_mb"]),
            "reference_time_s": med("box_ref"), "fast_time_s": med("box_fast"),
            "reference_peak_mb": res["box_ref"].get("peak_mb"), "fast_peak_mb": res["box_fast"].get("peak_mb"),
            "shape": {"N": box["images"], "P": box["grid"] ** 2, "D": box["dim"], "M": box["boxes"]},
        },
        "device": args.device, "threads": args.threads,
        "memory": "cuda max_memory_allocated" if cuda else "ru_maxrss - rss after setup, fresh process each",
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
