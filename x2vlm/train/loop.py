"""The pre-training loop: every step takes one batch from each data source, weights each source's losses, and
steps the DeepSpeed engine. Metrics go to the console, a JSONL file and wandb; checkpoints every N steps."""
from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from x2vlm.config import ConfigError, RunConfig, StageConfig, save_config, to_dict
from x2vlm.train import checkpoint, distributed as dist_util
from x2vlm.train.engine import build_ds_config, build_engine, precision_of
from x2vlm.train.metrics import Metrics
from x2vlm.train.optim import build_optimizer



class TooManyBadSamples(RuntimeError):
    pass


class NonFiniteLoss(RuntimeError):
    pass


class StepGuard:
    """Skips steps whose loss is not finite on some rank (every rank skips together) and stops the run after
    `limit` consecutive ones. A skipped step changes no weight and no optimiser state, so every checkpoint,
    also one saved right after skipped steps, holds the weights of the last good step."""

    def __init__(self, limit: int):
        self.limit, self.skipped, self.consecutive = limit, 0, 0

    def finite(self, loss: torch.Tensor, step: int) -> bool:
        ok = torch.isfinite(loss.detach().float()).all().float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok.item()):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteLoss(f"step {step + 1}: the loss was not finite in {self.consecutive} consecutive steps "
                                f"(train.max_bad_steps {self.limit}); stopping, the last checkpoint is intact")
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: dict, device, float_dtype) -> dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if k in ("images", "videos"):
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


def plan_stages(cfg: RunConfig) -> list[tuple[StageConfig, int, int]]:
    """(stage, first step, end step) in run order; steps are counted over the whole run. No declared stages: one
    stage "main" over all sources for train.steps steps."""
    stages = cfg.train.stages or [StageConfig(name="main", steps=cfg.train.steps,
                                              sources=[s.name for s in cfg.data.sources])]
    out, begin = [], 0
    for st in stages:
        out.append((st, begin, begin + st.steps))
        begin += st.steps
    return out


def stage_train_config(cfg: RunConfig, stage: StageConfig):
    """The optimiser settings of one stage: its own step count and learning rate, a fresh schedule."""
    return dataclasses.replace(cfg.train, steps=stage.steps, lr=stage.lr or cfg.train.lr,
                               warmup_steps=min(cfg.train.warmup_steps, stage.steps))


def pretrain(cfg: RunConfig, resume: str | None = None, stage: str | None = None, init: str | None = None) -> dict:
    """Runs on every rank; returns the last step's metrics (rank 0's view).

    Stages run in order. The first starts from `init` (an exported checkpoint, weights only) or from the
    backbones' own initialisation; each later stage starts from the weights its predecessor ended with, with a
    fresh optimiser and schedule, and records where its weights came from in its checkpoints. `stage` runs that
    stage alone (its first step is where the plan puts it), starting from `init` when given. `resume` continues
    an interrupted run from its latest (or a named) checkpoint, in whichever stage it stopped."""
    dist_util.init_distributed()
    rank, world = dist_util.rank(), dist_util.world_size()
    tokenizer = load_run_tokenizer(cfg)
    plan = plan_stages(cfg)
    if stage is not None:
        if stage not in [st.name for st, _, _ in plan]:
            raise ConfigError(f"--stage: expected one of {[st.name for st, _, _ in plan]}, got {stage!r}")
        plan = [p for p in plan if p[0].name == stage]
    start = checkpoint.step_of(cfg, resume) if resume else plan[0][1]
    handoff = {"path": str(init), "sha256": checkpoint.weights_sha256(init)} if init else None  # fails early
    out = Path(cfg.train.out_dir)
    metrics = None
    if dist_util.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        metrics = Metrics(str(out), plan[-1][2], to_dict(cfg), cfg.train.wandb_mode, cfg.train.wandb_project,
                          start_step=start)
    last: dict = {}
    for index, (st, begin, end) in enumerate(plan):
        if start >= end:
            continue
        resuming = resume is not None and begin < start
        seed_everything(cfg.train.seed + rank + start)
        model = build_model(cfg, tokenizer)
        if handoff and not resuming:
            checkpoint.load_weights(model, handoff["path"])
        tcfg = stage_train_config(cfg, st)
        opt, sched = build_optimizer(model, tcfg)
        ds = build_ds_config(cfg, world, sources=st.sources)
        engine = build_engine(model, opt, sched, ds)
        state = {"stage": st.name, "stage_index": index, "stage_begin": begin, "stage_end": end}
        if resuming:
            loaded = checkpoint.resume(engine, cfg, resume)
            handoff = loaded.get("init_from")
        state["init_from"] = handoff
        if dist_util.is_main():
            n_params = sum(p.numel() for p in model.parameters())
            came = f"from {handoff['path']}" if handoff else "from scratch"
            print(f"[x2vlm] stage {st.name!r} ({', '.join(st.sources)}): {n_params / 1e6:.2f}M parameters, "
                  f"{world} rank(s), {precision_of(ds)}, ZeRO-{engine.zero_optimization_stage()}, steps "
                  f"{start}..{end}, weights {came}", flush=True)
        last = run_stage(engine, sched, precision_of(ds), tokenizer, cfg, st, start, end, metrics, state)
        handoff = {"path": str(checkpoint.checkpoint_dir(cfg) / f"step{end}"), "stage": st.name, "step": end}
        handoff["sha256"] = checkpoint.weights_sha256(handoff["path"])
        start = end
        del engine, model, opt
    if metrics:
        metrics.close()
    dist_util.barrier()
    return last


def run_stage(engine, sched, precision: str, tokenizer, cfg: RunConfig, stage: StageConfig, start: int, end: int,
              metrics, state: dict) -> dict:
    """Steps start..end of one stage: one batch of each of the stage's sources per step."""
    from x2vlm.data.pipeline import build_loaders

    world = dist_util.world_size()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    sources = [s for s in cfg.data.sources if s.name in stage.sources]
    # A resumed run reads its sources with a fresh seed so that it does not repeat the first batches.
    loaders = build_loaders(dataclasses.replace(cfg.data, sources=sources), tokenizer,
                            image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
                            loss_cfg=cfg.loss, seed=cfg.train.seed + start)
    iters = {name: iter(loader) for name, loader in loaders.items()}
    weights = {s.name: s.weight for s in sources}
    monitor = SkipMonitor(cfg.data.max_skip_fraction)
    guard = StepGuard(cfg.train.max_bad_steps)
    engine.train()
    last: dict = {}
    t_last, n_images, wait, window_start = time.perf_counter(), 0, 0.0, start
    for step in range(start, end):
        sums: dict[str, float] = {}
        for _ in range(cfg.train.grad_accum):
            total = 0.0
            for name, it in iters.items():
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                monitor.add(batch)
                n_images += len(batch["keys"])
                losses = engine(to_device(batch, engine.device, dtype))
                total = total + weights[name] * losses["loss"]
                for k, v in losses.items():
                    sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float(v.detach()) / cfg.train.grad_accum
            if guard.finite(total, step):
                engine.backward(total)
                engine.step()
            elif cfg.train.grad_accum > 1:  # the bad micro-batch adds nothing; the others still make the step
                engine.step()
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / cfg.train.grad_accum
        done = step + 1
        if done % cfg.train.log_every == 0 or done == end or done == start + 1:
            totals = monitor.totals()
            monitor.check(totals)
            now = time.perf_counter()
            grad_norm = engine.get_global_grad_norm()
            last = {**sums, **totals, "stage": state["stage_index"], "skipped_steps": guard.skipped,
                    "lr": sched.get_last_lr()[0],
                    "temp": float(engine.module.temperature().detach()),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "samples_per_s": n_images * world / max(1e-9, now - t_last),
                    "data_wait_s_per_step": wait / max(1, done - window_start),
                    "data_wait_frac": wait / max(1e-9, now - t_last)}
            t_last, n_images, wait, window_start = now, 0, 0.0, done
            if metrics:
                metrics.log(done, last)
        if done % cfg.train.save_every == 0 or done == end:
            checkpoint.save(engine, cfg, done, extra=state)
    return last
