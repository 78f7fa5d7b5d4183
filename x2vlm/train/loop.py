"""The training loop, for pre-training and fine-tuning alike: every step takes one batch from each data source of
the current stage, runs that source's objective, weights its losses, and steps the DeepSpeed engine. Metrics
(reduced over ranks: x2vlm.train.telemetry) go to the console, JSONL files and wandb; held-out evaluation every N
steps (x2vlm.train.evaluator); checkpoints every N steps.

    Trainer(cfg).fit(resume="latest")

Everything that must survive a crash is a part registered with the Checkpointer (x2vlm.train.state); the loop
itself is a handful of verbs: step, log, evaluate, save.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from x2vlm import distributed
from x2vlm.config import ConfigError, RunConfig, save_config, to_dict
from x2vlm.objectives import for_source
from x2vlm.pretrained import build_model, load_weights, weights_sha256
from x2vlm.train.checkpoint import Checkpointer, checkpoint_dir, require_shared_dir, step_of
from x2vlm.train.engine import build_ds_config, build_engine, offloads_optimizer, precision_of
from x2vlm.train.evaluator import Evaluator
from x2vlm.train.flops import FlopModel, peak_flops
from x2vlm.train.metrics import Metrics
from x2vlm.train.optim import build_optimizer
from x2vlm.train.rng import RandomState, seed_everything
from x2vlm.train.stages import Stage, plan_stages, select_stage
from x2vlm.train.state import DataStreams, SampleLog, SkipMonitor, StepGuard
from x2vlm.train.telemetry import StepStats

log = logging.getLogger("x2vlm")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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


def require_eval_shards(held) -> None:
    """Evaluation during training has held-out shards, and they exist (ConfigError naming the key otherwise)."""
    from x2vlm.data.shards import require_existing

    if not held.shard_sets():
        raise ConfigError("train.eval_every: evaluation needs held-out shards in train.eval (images, regions, "
                          "videos or videoqa)")
    for key, shards in held.shard_sets().items():
        require_existing(shards, f"train.eval.{key}")


def stage_handoff(cfg: RunConfig, stage: Stage) -> dict:
    """Where the stage after `stage` takes its weights from: the checkpoint at `stage`'s last step."""
    path = str(checkpoint_dir(cfg) / f"step{stage.end}")
    return {"path": path, "stage": stage.name, "step": stage.end, "sha256": weights_sha256(path)}


def previous_stage_weights(cfg: RunConfig, previous: Stage, stage: Stage) -> dict:
    """Where a later stage run alone (`--stage`, no `--init`) takes its weights from: the previous stage's last
    checkpoint in this run's folder; ConfigError when it is not there (never a silent start from scratch)."""
    path = checkpoint_dir(cfg) / f"step{previous.end}"
    if not (path / "model.safetensors").exists():
        raise ConfigError(f"--stage {stage.name}: it starts from the weights stage {previous.name!r} ends with, and "
                          f"{path} has none: run that stage first (same train.out_dir; train.keep_last may have "
                          f"pruned it) or give --init CHECKPOINT")
    return stage_handoff(cfg, previous)


class Trainer:
    """Runs on every rank. `fit` runs the stages in order: the first starts from `init` (an export, weights only)
    or from the backbones' own initialisation; each later stage from the weights its predecessor ended with, with
    a fresh optimiser and schedule, recording where its weights came from in its checkpoints."""

    def __init__(self, cfg: RunConfig):
        from x2vlm.data.shards import require_shards

        require_shards(cfg.data.sources)
        if cfg.train.eval_every:
            require_eval_shards(cfg.train.eval)
        distributed.init()
        self.cfg = cfg
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.tokenizer = load_run_tokenizer(cfg)
        self.metrics: Metrics | None = None

    def fit(self, resume: str | None = None, stage: str | None = None, init: str | None = None) -> dict:
        """All stages (or the one named by `stage`, its first step where the plan puts it); `resume` continues an
        interrupted run from its latest (or a named) checkpoint, in whichever stage it stopped. Returns the last
        logged metrics (rank 0's view)."""
        cfg = self.cfg
        whole = plan_stages(cfg)
        plan = select_stage(whole, stage)
        require_shared_dir(checkpoint_dir(cfg))
        start = step_of(cfg, resume) if resume else plan[0].begin
        if stage is not None and not plan[0].begin <= start <= plan[0].end:
            raise ConfigError(f"--resume {resume}: step {start} is outside stage {stage!r} (steps "
                              f"{plan[0].begin}..{plan[0].end})")
        handoff = {"path": str(init), "sha256": weights_sha256(init)} if init else None  # fails early
        if handoff is None and resume is None and plan[0].index > 0:  # a later stage alone, in its own run
            handoff = previous_stage_weights(cfg, whole[plan[0].index - 1], plan[0])
        if distributed.is_main():
            out = Path(cfg.train.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
            self.metrics = Metrics(str(out), plan[-1].end, to_dict(cfg), cfg.train.wandb_mode,
                                   cfg.train.wandb_project, start_step=start)
        self.measure_peak()
        self.evaluator = Evaluator(cfg, self.tokenizer, self.device, plan[-1].end) if cfg.train.eval_every else None
        last: dict = {}
        for st in plan:
            if start >= st.end:
                continue
            if resume is not None and st.begin == start and st.index > 0:  # resumed at the previous stage's end
                handoff = stage_handoff(cfg, whole[st.index - 1])
            last = self.run_stage(st, start, handoff, resume if resume is not None and st.begin < start else None)
            handoff, start = stage_handoff(cfg, st), st.end
        if self.metrics:
            self.metrics.close()
        distributed.barrier()
        return last

    def run_stage(self, stage: Stage, start: int, handoff: dict | None, resume: str | None) -> dict:
        """Steps start..stage.end of a stage."""
        self.start_stage(stage, start, handoff, resume)
        last: dict = {}
        if start == 0:  # a run from scratch: the untrained model's held-out numbers first
            self.evaluate(0)
        for step in range(start, stage.end):
            self.train_step(step)
            done = step + 1
            if done % self.cfg.train.log_every == 0 or done == stage.end or done == start + 1:
                last = self.log_step(done)
            if done % self.cfg.train.save_every == 0 or done == stage.end:
                self.checkpointer.save(done, self.run_state)
            self.evaluate(done)  # after the save: an evaluation that fails loses no checkpoint
        self.samples.close()
        del self.engine, self.checkpointer, self.streams  # the stage's loader workers stop here
        return last

    def start_stage(self, stage: Stage, start: int, handoff: dict | None, resume: str | None) -> None:
        """Model, engine, data streams and the parts of the run state, restored from `resume` when given."""
        from x2vlm.data.pipeline import build_loaders

        cfg = self.cfg
        seed_everything(cfg.train.seed + self.rank + start)
        model = build_model(cfg, self.tokenizer)
        if handoff and not resume:
            load_weights(model, handoff["path"])
        ds = build_ds_config(cfg, self.world, sources=stage.sources)
        opt, self.sched = build_optimizer(model, stage.train_config(cfg.train), offload=offloads_optimizer(ds))
        self.engine, self.precision = build_engine(model, opt, self.sched, ds), precision_of(ds)
        self.sources = [s for s in cfg.data.sources if s.name in stage.sources]
        self.objectives = {s.name: for_source(s.kind, cfg.loss) for s in self.sources}
        loaders = build_loaders(dataclasses.replace(cfg.data, sources=self.sources), self.tokenizer,
                                image_size=cfg.model.vision.image_size, max_len=cfg.model.text.max_len,
                                loss_cfg=cfg.loss, seed=cfg.train.seed + stage.begin)
        self.streams = DataStreams(loaders, cfg.data.num_workers)
        self.guard, self.monitor = StepGuard(cfg.train.max_bad_steps), SkipMonitor(cfg.data.max_skip_fraction)
        log_path = Path(cfg.train.out_dir) / "samples" / f"rank{self.rank}.jsonl" if cfg.train.sample_log else None
        self.samples = SampleLog(log_path, start)
        self.checkpointer = Checkpointer(self.engine, cfg, {"world_size": self.world,
                                                            "num_workers": cfg.data.num_workers})
        for name, part in (("data", self.streams), ("skips", self.monitor), ("guard", self.guard),
                           ("samples", self.samples), ("rng", RandomState())):  # restored in this order
            self.checkpointer.register(name, part)
        self.stage = stage
        self.run_state = {"stage": stage.name, "stage_index": stage.index, "stage_begin": stage.begin,
                          "stage_end": stage.end, "init_from": handoff}
        if resume:
            self.run_state["init_from"] = self.checkpointer.restore(resume).get("init_from")
        came = f"from {self.run_state['init_from']['path']}" if self.run_state["init_from"] else "from scratch"
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # (ZeRO-3 partitions them)
        log.info(f"stage {stage.name!r} ({', '.join(stage.sources)}): {n_params / 1e6:.2f}M parameters, "
                 f"{self.world} rank(s), {self.precision}, ZeRO-{self.engine.zero_optimization_stage()}, steps "
                 f"{start}..{stage.end}, weights {came}")
        self.engine.train()
        flops = FlopModel(cfg.model, model.text.vocab_size, cfg.loss.itc_impl, self.world)
        self.stats = StepStats(self.sources, flops, self.engine.device, self.peak, start)

    def measure_peak(self) -> None:
        """The peak FLOP/s of one device that MFU is held against: a table for known GPUs, else the best matrix
        product rate that any rank measures (all at once, briefly)."""
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        precision = precision_of(build_ds_config(self.cfg, self.world))
        peak, where = peak_flops(self.device, precision)
        self.peak = float(distributed.all_reduce(torch.tensor([peak], dtype=torch.float64), "max"))
        log.info(f"peak {self.peak / 1e12:.3g} TFLOP/s per device ({where}) for MFU")
        if self.metrics:
            self.metrics.summary({"peak_tflops": self.peak / 1e12, "peak_source": where})

    def train_step(self, step: int) -> None:
        """One optimiser step (over train.grad_accum micro-batches). Its losses stay on the device, added up in
        self.stats until the next log step: no loss is read back here."""
        accum, dtype = self.cfg.train.grad_accum, DTYPES[self.precision]
        applied, all_finite = False, True
        for _ in range(accum):
            total, terms = 0.0, {}
            for s in self.sources:
                t0 = time.perf_counter()
                batch = self.streams.next(s.name)
                self.stats.batch(s.name, batch, time.perf_counter() - t0)
                self.samples.add(step, s.name, batch["keys"])
                self.monitor.add(batch)
                terms[s.name] = self.engine(to_device(batch, self.engine.device, dtype), self.objectives[s.name])
                total = total + s.weight * terms[s.name]["loss"]
            finite = self.guard.finite(total)
            all_finite = all_finite and finite
            if finite:  # a skipped micro-batch's losses stay out of the logged means (skipped_steps counts it)
                for name, losses in terms.items():
                    self.stats.losses(name, losses)
                self.stats.total(total)
                self.engine.backward(total)
            if finite or accum > 1:  # a bad micro-batch adds nothing; the others make the step
                self.engine.step()  # skips the update itself when the gradient is not finite
                applied = self.engine.was_step_applied()
        self.guard.record(applied, step, overflow=self.precision == "fp16" and all_finite and not applied)
        self.samples.flush()

    def log_step(self, done: int) -> dict:
        """Metrics of the steps since the last log, over all ranks (a collective: every rank calls it)."""
        totals = self.monitor.totals()
        self.monitor.check(totals)
        grad_norm = self.engine.get_global_grad_norm()
        values = {**self.stats.reduce(done), **totals, "stage": self.stage.index, "skipped_steps": self.guard.skipped,
                  **({"overflow_steps": self.guard.overflows, "loss_scale": float(self.engine.optimizer.loss_scale)}
                     if self.precision == "fp16" else {}),
                  "lr": self.sched.get_last_lr()[0], "temp": float(self.engine.module.temperature().detach()),
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if self.metrics:
            self.metrics.log(done, values)
        return values

    def evaluate(self, step: int) -> None:
        """Held-out evaluation at the evaluator's steps (every rank calls it; the main rank evaluates). Its time
        is left out of the step-time window."""
        if self.evaluator is None or not self.evaluator.due(step):
            return
        t0 = time.perf_counter()
        record = self.evaluator.run(self.engine.module, step)
        if self.metrics and record:
            self.metrics.log_eval(step, {**record, "seconds": round(time.perf_counter() - t0, 2)})
        self.stats.exclude(time.perf_counter() - t0)


def train(cfg: RunConfig, resume: str | None = None, stage: str | None = None, init: str | None = None) -> dict:
    """Pre-train or fine-tune as the configuration says (see Trainer.fit)."""
    return Trainer(cfg).fit(resume=resume, stage=stage, init=init)
