"""The pre-training loop: every step takes one batch from each data source, weights each source's losses, and
steps the DeepSpeed engine. Metrics go to the console, a JSONL file and wandb; checkpoints every N steps."""
from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from x2vlm.config import ConfigError, RunConfig, save_config, to_dict
from x2vlm.train import checkpoint, distributed as dist_util
from x2vlm.train.engine import build_ds_config, build_engine, precision_of
from x2vlm.train.metrics import Metrics
from x2vlm.train.optim import build_optimizer



class TooManyBadSamples(RuntimeError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device, float_dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if k == "images":
                v = v.to(float_dtype)
        out[k] = v
    return out


def load_run_tokenizer(cfg: RunConfig):
    from x2vlm.data.tokenizer import load_tokenizer

    if not cfg.model.text.tokenizer:
        raise ConfigError("model.text.tokenizer: expected a local tokenizer directory or a hub id "
                          "(`x2vlm demo` trains one on its data)")
    return load_tokenizer(cfg.model.text.tokenizer)


def build_model(cfg: RunConfig, tokenizer):
    from x2vlm.model import X2VLM

    return X2VLM(cfg.model, cfg.loss, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)


class SkipMonitor:
    """Adds up bad samples by kind on every rank and stops the run when their share passes the limit."""

    def __init__(self, limit: float):
        self.limit = limit
        self.bad: dict[str, int] = {}
        self.seen = 0

    def add(self, batch: dict) -> None:
        self.seen += len(batch.get("keys", ())) or int(batch["images"].shape[0])
        for kind, n in (batch.get("skipped") or {}).items():
            self.bad[kind] = self.bad.get(kind, 0) + int(n)

    def totals(self) -> dict:
        """Counts over all ranks (a collective: every rank calls it at the same step)."""
        kinds = sorted(self.bad)
        if dist.is_initialized() and dist.get_world_size() > 1:
            all_kinds = [None] * dist.get_world_size()
            dist.all_gather_object(all_kinds, kinds)
            kinds = sorted({k for ks in all_kinds for k in ks})
            t = torch.tensor([self.seen] + [self.bad.get(k, 0) for k in kinds], dtype=torch.float64)
            dist.all_reduce(t)
            seen, counts = int(t[0]), [int(x) for x in t[1:]]
        else:
            seen, counts = self.seen, [self.bad.get(k, 0) for k in kinds]
        return {"seen": seen, **{f"skipped/{k}": c for k, c in zip(kinds, counts)}}

    def check(self, totals: dict) -> None:
        bad = sum(v for k, v in totals.items() if k.startswith("skipped/"))
        frac = bad / max(1, bad + totals["seen"])
        if frac > self.limit:
            detail = ", ".join(f"{k[8:]}={v}" for k, v in totals.items() if k.startswith("skipped/"))
            raise TooManyBadSamples(f"{bad} of {bad + totals['seen']} samples were bad ({frac:.1%} > "
                                    f"data.max_skip_fraction {self.limit:.1%}): {detail}")


def pretrain(cfg: RunConfig, resume: str | None = None) -> dict:
    """Runs on every rank. Returns the last step's metrics (rank 0's view)."""
    from x2vlm.data.pipeline import build_loaders

    dist_util.init_distributed()
    rank, world = dist_util.rank(), dist_util.world_size()
    seed_everything(cfg.train.seed + rank)
    tokenizer = load_run_tokenizer(cfg)
    model = build_model(cfg, tokenizer)
    ds = build_ds_config(cfg, world)
    opt, sched = build_optimizer(model, cfg.train)
    engine = build_engine(model, opt, sched, ds)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision_of(ds)]

    out = Path(cfg.train.out_dir)
    start = checkpoint.resume(engine, cfg, resume) if resume else 0
    if dist_util.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"[x2vlm] {n_params / 1e6:.2f}M parameters, {world} rank(s), {precision_of(ds)}, "
              f"ZeRO-{engine.zero_optimization_stage()}, steps {start}..{cfg.train.steps}", flush=True)
    # A resumed run reads its sources with a fresh seed so that it does not repeat the first batches.
    loaders = build_loaders(cfg.data, tokenizer, image_size=cfg.model.vision.image_size,
                            max_len=cfg.model.text.max_len, loss_cfg=cfg.loss, seed=cfg.train.seed + start)
    iters = {name: iter(loader) for name, loader in loaders.items()}
    weights = {s.name: s.weight for s in cfg.data.sources}
    metrics = Metrics(str(out), cfg.train.steps, to_dict(cfg), cfg.train.wandb_mode, cfg.train.wandb_project,
                      start_step=start) if dist_util.is_main() else None
    monitor = SkipMonitor(cfg.data.max_skip_fraction)
    engine.train()
    last: dict = {}
    t_last, n_images, wait, window_start = time.perf_counter(), 0, 0.0, start
    for step in range(start, cfg.train.steps):
        sums: dict[str, float] = {}
        for _ in range(cfg.train.grad_accum):
            total = 0.0
            for name, it in iters.items():
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                monitor.add(batch)
                n_images += int(batch["images"].shape[0])
                losses = engine(to_device(batch, engine.device, dtype))
                total = total + weights[name] * losses["loss"]
                for k, v in losses.items():
                    sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float(v.detach()) / cfg.train.grad_accum
            engine.backward(total)
            engine.step()
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / cfg.train.grad_accum
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps or done == start + 1:
            totals = monitor.totals()
            monitor.check(totals)
            now = time.perf_counter()
            grad_norm = engine.get_global_grad_norm()
            last = {**sums, **totals, "lr": sched.get_last_lr()[0],
                    "temp": float(engine.module.temperature().detach()),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": n_images * world / max(1e-9, now - t_last),
                    "data_wait_s_per_step": wait / max(1, done - window_start),
                    "data_wait_frac": wait / max(1e-9, now - t_last)}
            t_last, n_images, wait, window_start = now, 0, 0.0, done
            if metrics:
                metrics.log(done, last)
        if done % cfg.train.save_every == 0 or done == cfg.train.steps:
            checkpoint.save(engine, cfg, done)
    if metrics:
        metrics.close()
    dist_util.barrier()
    return last
