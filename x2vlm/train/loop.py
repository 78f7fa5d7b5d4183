"""The pre-training loop: every step takes one batch from each data source, weights each source's losses, and
steps the DeepSpeed engine. Metrics go to the console, a JSONL file and wandb; checkpoints every N steps."""
from __future__ import annotations

import dataclasses
import json
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
    """Skips steps whose loss is not finite on some rank (every rank skips together) or whose gradient is not
    finite (DeepSpeed then leaves weights and optimiser state alone), and stops the run after `limit` consecutive
    skipped steps. A skipped step changes no weight and no optimiser state, so every checkpoint, also one saved
    right after skipped steps, holds the weights of the last good step."""

    def __init__(self, limit: int):
        self.limit, self.skipped, self.consecutive = limit, 0, 0

    @staticmethod
    def finite(loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (a collective)."""
        ok = torch.isfinite(loss.detach().float()).all().float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def record(self, applied: bool, step: int) -> None:
        """After each step: whether its update was applied."""
        if applied:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteLoss(f"step {step + 1}: the loss or gradient was not finite in {self.consecutive} "
                                f"consecutive steps (train.max_bad_steps {self.limit}); stopping, the last "
                                f"checkpoint is intact")

    def state(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]


class SampleLog:
    """With train.sample_log, each rank appends {"step", "source", "keys"} per batch to OUT/samples/rankN.jsonl:
    which samples made which step. A resumed run first drops the lines of steps after its checkpoint (their
    updates were lost with the crash), so the file always lists the samples that made the current weights."""

    def __init__(self, cfg: RunConfig, rank: int, start: int):
        self.file = None
        if not cfg.train.sample_log:
            return
        path = Path(cfg.train.out_dir) / "samples" / f"rank{rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < start:
                        kept.append(line + "\n")
                except ValueError:  # a line cut off by a crash
                    pass
        path.write_text("".join(kept))
        self.file = open(path, "a")

    def add(self, step: int, source: str, keys) -> None:
        if self.file:
            self.file.write(json.dumps({"step": step, "source": source, "keys": list(keys)}) + "\n")

    def flush(self) -> None:
        if self.file:
            self.file.flush()


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

    def state(self) -> dict:
        return {"seen": self.seen, "bad": dict(self.bad)}

    def load(self, state: dict) -> None:
        self.seen, self.bad = state["seen"], dict(state["bad"])

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
        if resume is not None and begin == start and index > 0:  # resumed at the end of the previous stage
            handoff = stage_handoff(cfg, plan[index - 1][0], begin)
        seed_everything(cfg.train.seed + rank + start)
        model = build_model(cfg, tokenizer)
        if handoff and not resuming:
            checkpoint.load_weights(model, handoff["path"])
        tcfg = stage_train_config(cfg, st)
        opt, sched = build_optimizer(model, tcfg)
        ds = build_ds_config(cfg, world, sources=st.sources)
        engine = build_engine(model, opt, sched, ds)
        state = {"stage": st.name, "stage_index": index, "stage_begin": begin, "stage_end": end,
                 "world_size": world, "num_workers": cfg.data.num_workers}
        rank_state = restart = None
        if resuming:
            loaded = checkpoint.resume(engine, cfg, resume)
            handoff = loaded.get("init_from")
            same = loaded.get("world_size") == world and loaded.get("num_workers") == cfg.data.num_workers
            rank_state = checkpoint.read_rank_state(cfg, resume, rank) if same else None
            if rank_state is None:
                restart = checkpoint.next_epochs(cfg, resume)
                if dist_util.is_main():
                    print(f"[x2vlm] resuming {loaded.get('world_size')} rank(s) x {loaded.get('num_workers')} "
                          f"loader worker(s) as {world} x {cfg.data.num_workers}: weights, optimiser state and "
                          f"schedule continue exactly; the data streams start at new epochs {restart} (the rest "
                          f"of the interrupted epochs is not read) and the random generators are seeded anew, so "
                          f"the run no longer matches an uninterrupted one bit for bit", flush=True)
        state["init_from"] = handoff
        if dist_util.is_main():
            n_params = sum(p.numel() for p in model.parameters())
            came = f"from {handoff['path']}" if handoff else "from scratch"
            print(f"[x2vlm] stage {st.name!r} ({', '.join(st.sources)}): {n_params / 1e6:.2f}M parameters, "
                  f"{world} rank(s), {precision_of(ds)}, ZeRO-{engine.zero_optimization_stage()}, steps "
                  f"{start}..{end}, weights {came}", flush=True)
        last = run_stage(engine, sched, precision_of(ds), tokenizer, cfg, st, (begin, start, end), metrics, state,
                         rank_state, restart_epochs=restart)
        handoff = stage_handoff(cfg, st, end)
        start = end
        del engine, model, opt
    if metrics:
        metrics.close()
    dist_util.barrier()
    return last


def stage_handoff(cfg: RunConfig, stage: StageConfig, end: int) -> dict:
    """Where the stage after `stage` takes its weights from: the checkpoint at `stage`'s last step."""
    path = str(checkpoint.checkpoint_dir(cfg) / f"step{end}")
    return {"path": path, "stage": stage.name, "step": end, "sha256": checkpoint.weights_sha256(path)}


def run_stage(engine, sched, precision: str, tokenizer, cfg: RunConfig, stage: StageConfig,
              steps: tuple[int, int, int], metrics, state: dict, rank_state: dict | None = None,
              restart_epochs: dict | None = None) -> dict:
    """Steps start..end of a stage that begins at `begin` (steps = (begin, start, end)): one batch of each of the
    stage's sources per step. `rank_state` (saved by this rank at step start) continues the data streams, the
    random generators and the counters exactly where they were; `restart_epochs` {source: epoch} starts the
    streams at those epochs instead (a resume on another number of ranks)."""
    from x2vlm.data.pipeline import build_loaders

    begin, start, end = steps
    world, rank = dist_util.world_size(), dist_util.rank()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    sources = [s for s in cfg.data.sources if s.name in stage.sources]
    loaders = build_loaders(dataclasses.replace(cfg.data, sources=sources), tokenizer,
                            image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
                            loss_cfg=cfg.loss, seed=cfg.train.seed + begin)
    monitor = SkipMonitor(cfg.data.max_skip_fraction)
    guard = StepGuard(cfg.train.max_bad_steps)
    data = {name: {"consumed": 0, "workers": {}} for name in loaders}
    if rank_state is not None:
        data = rank_state["data"]
        for name, loader in loaders.items():
            loader.dataset.resume_at(data[name]["workers"], data[name]["consumed"], cfg.data.num_workers)
        monitor.load(rank_state["skips"])
        guard.load(rank_state["guard"])
    elif restart_epochs:
        for name, loader in loaders.items():
            loader.dataset.stream.set_epoch(restart_epochs.get(name, 0))
    iters = {name: iter(loader) for name, loader in loaders.items()}
    if rank_state is not None:  # after the loaders' workers started: they draw no number from these
        checkpoint.set_rng_state(rank_state["rng"])
    weights = {s.name: s.weight for s in sources}
    log = SampleLog(cfg, rank, start)
    engine.train()
    last: dict = {}
    t_last, n_images, wait, window_start = time.perf_counter(), 0, 0.0, start
    for step in range(start, end):
        sums: dict[str, float] = {}
        applied = False
        for _ in range(cfg.train.grad_accum):
            total = 0.0
            for name, it in iters.items():
                t0 = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - t0
                position = batch.pop("_position")
                data[name]["workers"][str(position["worker"])] = position
                data[name]["consumed"] += 1
                log.add(step, name, batch["keys"])
                monitor.add(batch)
                n_images += len(batch["keys"])
                losses = engine(to_device(batch, engine.device, dtype))
                total = total + weights[name] * losses["loss"]
                for k, v in losses.items():
                    sums[f"{name}/{k}"] = sums.get(f"{name}/{k}", 0.0) + float(v.detach()) / cfg.train.grad_accum
            finite = guard.finite(total)
            if finite:
                engine.backward(total)
            if finite or cfg.train.grad_accum > 1:  # a bad micro-batch adds nothing; the others make the step
                engine.step()  # skips the update itself when the gradient is not finite
                applied = engine.was_step_applied()
            sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) / cfg.train.grad_accum
        guard.record(applied, step)
        log.flush()
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
            mine = {"data": data, "rng": checkpoint.rng_state(), "skips": monitor.state(), "guard": guard.state()}
            checkpoint.save(engine, cfg, done, extra=state, rank_state=mine)
    return last
