"""Where a training step's time goes: data (per source), forward per source split by model part, backward and
the optimiser step, for a configuration's last stage, in one process (no DeepSpeed; AdamW as the trainer builds
it). Medians over the measured steps, after warm-up steps.

    python scripts/profile_step.py                     # the tiny preset on ShapesWorld, as the demo trains it
    python scripts/profile_step.py --steps 30 train.precision=fp32 model.vision.depth=6

Prints a table and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

PARTS = ("vision", "temporal", "text", "fusion")


def main(argv=None) -> dict:
    from x2vlm.config import load_config, update
    from x2vlm.data.pipeline import build_loaders
    from x2vlm.data.tokenizer import load_tokenizer
    from x2vlm.demo.run import prepare_data
    from x2vlm.objectives import for_source
    from x2vlm.pretrained import build_model
    from x2vlm.train.optim import build_optimizer
    from x2vlm.train.stages import plan_stages

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_config(args.config, args.overrides)
        paths = prepare_data(Path(tmp), 600, 8, 0, base.model.vision.image_size, 4, n_train_clips=96,
                             n_heldout_clips=4)
        shards = {"image": paths["train"], "region": paths["train"], "video": paths["train_video"]}
        cfg = update(base, {**{f"data.sources.{i}.shards": shards[s.kind] for i, s in enumerate(base.data.sources)
                               if s.kind in shards}, "model.text.tokenizer": str(Path(tmp) / "tokenizer")})
        stage = plan_stages(cfg)[-1]
        sources = [s for s in cfg.data.sources if s.name in stage.sources]
        tok = load_tokenizer(cfg.model.text.tokenizer)
        torch.manual_seed(0)
        model = build_model(cfg, tok).train()
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": torch.bfloat16}.get(cfg.train.precision,
                                                                                          torch.float32)
        model = model.to(dtype)
        opt, _ = build_optimizer(model, stage.train_config(cfg.train))
        loaders = build_loaders(cfg.data.__class__(**{**cfg.data.__dict__, "sources": sources}), tok,
                                cfg.model.vision.image_size, cfg.model.text.max_len, cfg.loss, seed=0)
        iters = {name: iter(loader) for name, loader in loaders.items()}
        objectives = {s.name: for_source(s.kind, cfg.loss) for s in sources}
        clock = defaultdict(float)
        stack = []

        def pre(name):
            def hook(_module, _inputs):
                stack.append((name, time.perf_counter()))
            return hook

        def post(name):
            def hook(_module, _inputs, _output):
                part, t0 = stack.pop()
                clock[part] += time.perf_counter() - t0
            return hook

        for part in PARTS:
            getattr(model, part).register_forward_pre_hook(pre(part))
            getattr(model, part).register_forward_hook(post(part))
        rows = []
        for step in range(args.warmup + args.steps):
            clock.clear()
            times = {}
            total = 0
            for s in sources:
                t0 = time.perf_counter()
                batch = next(iters[s.name])
                times[f"data/{s.name}"] = time.perf_counter() - t0
                batch = {k: (v.to(dtype) if k in ("images", "videos") else v) for k, v in batch.items()}
                before = dict(clock)
                t0 = time.perf_counter()
                total = total + s.weight * model(batch, objectives[s.name])["loss"]
                times[f"forward/{s.name}"] = time.perf_counter() - t0
                for part in PARTS:
                    spent = clock.get(part, 0.0) - before.get(part, 0.0)
                    if spent:
                        times[f"forward/{s.name}/{part}"] = spent
            t0 = time.perf_counter()
            total.backward()
            times["backward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times["optimizer"] = time.perf_counter() - t0
            if step >= args.warmup:
                rows.append(times)
        keys = sorted({k for r in rows for k in r}, key=lambda k: (k.split("/")[0] != "data", k))
        median = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}
        step_s = sum(v for k, v in median.items() if k.count("/") < 2)
        print(f"{'phase':<40}{'ms':>10}{'share':>8}")
        for k, v in median.items():
            share = f"{v / step_s:>8.1%}" if k.count("/") < 2 else ""  # a part of a source's forward: no share
            print(f"{k:<40}{1000 * v:>10.1f}{share}")
        print(f"{'step':<40}{1000 * step_s:>10.1f}  ({1 / step_s:.2f} steps/s, one process)")
        result = {"config": args.config, "overrides": args.overrides, "sources": [s.name for s in sources],
                  "median_ms": {k: round(1000 * v, 2) for k, v in median.items()},
                  "step_ms": round(1000 * step_s, 2), "steps_per_s": round(1 / step_s, 3)}
        print(json.dumps(result))
        return result


if __name__ == "__main__":
    main()
