"""The parts of a run that must survive a crash, each with state_dict() / load_state_dict(): where every data
stream stands, the step guard, the skip monitor and the sample log. A Checkpointer saves and restores them
(x2vlm.train.checkpoint); the loop only uses them.

A part may also offer `load_other_layout(states)`: how to continue from the states that every rank of a run with
another number of ranks or loader workers saved. Parts without it start afresh then.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from x2vlm import distributed
from x2vlm.data.samples import SKIP_KINDS


class TooManyBadSamples(RuntimeError):
    pass


class NonFiniteLoss(RuntimeError):
    pass


class DataStreams:
    """One loader per data source of a stage, and where each stands: per source the batches taken and, per
    loader worker, its position after the last batch it made (see x2vlm.data.pipeline.SourceBatches)."""

    def __init__(self, loaders: dict, num_workers: int):
        self.loaders, self.num_workers = loaders, num_workers
        self.positions = {name: {"consumed": 0, "workers": {}} for name in loaders}
        self.iters: dict | None = None

    def next(self, name: str) -> dict:
        """The next batch of a source (its workers start on the first call)."""
        if self.iters is None:
            self.iters = {n: iter(loader) for n, loader in self.loaders.items()}
        batch = next(self.iters[name])
        position = batch.pop("_position")
        self.positions[name]["workers"][str(position["worker"])] = position
        self.positions[name]["consumed"] += 1
        return batch

    def state_dict(self) -> dict:
        return self.positions

    def load_state_dict(self, state: dict) -> None:
        self.positions = state
        for name, loader in self.loaders.items():
            loader.dataset.resume_at(state[name]["workers"], state[name]["consumed"], self.num_workers)

    def load_other_layout(self, states: list) -> dict:
        """Every stream starts at the epoch after the furthest one any old loader worker had begun (the rest of
        the interrupted epoch is not read); returns {source: epoch}."""
        epochs: dict = {}
        for state in states:
            for name, d in state.items():
                for pos in d["workers"].values():
                    epochs[name] = max(epochs.get(name, 0), pos["epoch"] + 1)
        for name, loader in self.loaders.items():
            loader.dataset.stream.set_epoch(epochs.get(name, 0))
        return epochs


class StepGuard:
    """Skips steps whose loss is not finite on some rank (every rank skips together) or whose gradient is not
    finite (DeepSpeed then leaves weights and optimiser state alone), and stops the run after `limit` consecutive
    skipped steps. A skipped step changes no weight and no optimiser state, so every checkpoint, also one saved
    right after skipped steps, holds the weights of the last good step.

    In fp16 a step whose loss is finite but whose scaled gradient overflows is the dynamic loss scaler at work
    (DeepSpeed lowers the scale and skips the step; it stops the run itself once the scale is at its minimum):
    such steps are counted apart, as overflows, and do not count towards the limit."""

    def __init__(self, limit: int):
        self.limit, self.skipped, self.consecutive, self.overflows = limit, 0, 0, 0

    @staticmethod
    def finite(loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (a collective)."""
        return distributed.all_true(bool(torch.isfinite(loss.detach().float()).all()))

    def record(self, applied: bool, step: int, overflow: bool = False) -> None:
        """After each step: whether its update was applied, and whether it was skipped for a loss-scale overflow."""
        if applied:
            self.consecutive = 0
            return
        if overflow:
            self.overflows += 1
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.limit:
            raise NonFiniteLoss(f"step {step + 1}: the loss or gradient was not finite in {self.consecutive} "
                                f"consecutive steps (train.max_bad_steps {self.limit}); stopping, the last "
                                f"checkpoint is intact")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = state["skipped"], state["consecutive"]
        self.overflows = state.get("overflows", 0)


class SkipMonitor:
    """Adds up samples and bad samples by kind on every rank and stops the run when the bad share passes the
    limit."""

    def __init__(self, limit: float):
        self.limit = limit
        self.bad: dict[str, int] = {}
        self.seen = 0

    def add(self, batch: dict) -> None:
        self.seen += len(batch["keys"])
        for kind, n in (batch.get("skipped") or {}).items():
            if kind not in SKIP_KINDS:
                raise ValueError(f"unknown kind of bad sample {kind!r} (expected one of {', '.join(SKIP_KINDS)})")
            self.bad[kind] = self.bad.get(kind, 0) + int(n)

    def totals(self) -> dict:
        """Counts over all ranks (a collective: every rank calls it at the same step); kinds that occurred."""
        local = torch.tensor([self.seen] + [self.bad.get(k, 0) for k in SKIP_KINDS], dtype=torch.float64)
        total = distributed.all_reduce(local).tolist()
        return {"seen": int(total[0]), **{f"skipped/{k}": int(c) for k, c in zip(SKIP_KINDS, total[1:]) if c}}

    def check(self, totals: dict) -> None:
        bad = sum(v for k, v in totals.items() if k.startswith("skipped/"))
        frac = bad / max(1, bad + totals["seen"])
        if frac > self.limit:
            detail = ", ".join(f"{k[8:]}={v}" for k, v in totals.items() if k.startswith("skipped/"))
            raise TooManyBadSamples(f"{bad} of {bad + totals['seen']} samples were bad ({frac:.1%} > "
                                    f"data.max_skip_fraction {self.limit:.1%}): {detail}")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad = state["seen"], dict(state["bad"])


class SampleLog:
    """With train.sample_log, each rank appends {"step", "source", "keys"} per batch to OUT/samples/rankN.jsonl:
    which samples made which step. The file always lists the samples that made the current weights: opening it
    for a run that starts at step `start`, or restoring the state of a checkpoint, drops the lines of later steps
    (their updates were lost with a crash)."""

    def __init__(self, path: Path | None, start: int):
        self.path, self.next_step, self.file = path, start, None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._keep_before(start)

    def _keep_before(self, step: int) -> None:
        if self.file:
            self.file.close()
        kept = []
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] < step:
                        kept.append(line + "\n")
                except ValueError:  # a line cut off by a crash
                    pass
        self.path.write_text("".join(kept))
        self.file = open(self.path, "a")

    def add(self, step: int, source: str, keys) -> None:
        self.next_step = step + 1
        if self.file:
            self.file.write(json.dumps({"step": step, "source": source, "keys": list(keys)}) + "\n")

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def state_dict(self) -> dict:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = state["next_step"]
        if self.path is not None:
            self._keep_before(self.next_step)
