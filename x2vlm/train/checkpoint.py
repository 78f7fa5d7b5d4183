"""Checkpoints: save, resume, prune.

A checkpoint `OUT/checkpoints/stepN/` holds DeepSpeed's own files (model, optimiser, scheduler, step), an export
beside them (x2vlm.pretrained: `model.safetensors` + `config.yaml` + tokenizer, which loads with no code from the
file), `run_state.json` (step, stage, number of ranks and loader workers, where the stage's weights came from) and
one `rankR.json` per rank with the state of every part registered with the Checkpointer (data positions, step
guard, skip counters, sample log, random generators).

Atomic: everything is written under `stepN.partial`; once every rank is done, rank 0 renames the folder to `stepN`
and only then points `latest` at it (a new file moved over the old one). A crash while saving leaves a `.partial`
folder, which the next save removes, and `latest` on the previous checkpoint, which still loads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from x2vlm import distributed
from x2vlm.config import ConfigError, RunConfig, to_dict
from x2vlm.pretrained import WEIGHTS, export_weights
from x2vlm.train import reshard

PARTIAL = ".partial"  # suffix of a checkpoint folder being written
STATE = "run_state.json"
RANK_STATE = "rank{}.json"
log = logging.getLogger("x2vlm")


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.out_dir) / "checkpoints"


def full_state_dict(engine) -> dict | None:
    """fp32 copies of all weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions when needed."""
    module = engine.module
    with distributed.full_parameters(module) if engine.zero_optimization_stage() == 3 else nullcontext():
        if not distributed.is_main():
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def require_shared_dir(folder: Path) -> None:
    """Every rank must see the same checkpoint folder: all ranks write their part of a checkpoint there and read it
    back on resume, so ranks on several nodes need a filesystem every node sees. Rank 0 leaves a marker with a
    number drawn for this launch; every rank looks for it; ConfigError on every rank when one does not find it."""
    if distributed.world_size() == 1:
        return
    drawn = int.from_bytes(os.urandom(7), "big") if distributed.is_main() else 0  # (no global generator touched)
    token = int(distributed.all_reduce(torch.tensor([drawn], dtype=torch.int64)).item())
    marker = Path(folder) / f".rank-check-{token}"
    if distributed.is_main():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(token))
    distributed.barrier()
    try:
        seen = marker.read_text() == str(token)
    except OSError:
        seen = False
    everyone = distributed.all_true(seen)
    if distributed.is_main():
        marker.unlink(missing_ok=True)
    if not everyone:
        raise ConfigError(f"train.out_dir: rank {distributed.rank()} {'sees' if seen else 'does not see'} the marker "
                          f"rank 0 left in {folder}: the ranks do not share this folder. Checkpoints need a "
                          f"filesystem that every node sees (a shared mount); put train.out_dir on one")


def write_latest(root: Path, tag: str) -> None:
    """Point `latest` at a complete checkpoint: write a new file, then move it over the old one (atomic)."""
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / "latest")


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, oldest first."""
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step(\d+)", p.name)) and p.is_dir())


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 = keep all); never the one named `keep`."""
    if keep_last <= 0:
        return
    for step in checkpoint_steps(root)[:-keep_last]:
        if f"step{step}" != keep:
            shutil.rmtree(root / f"step{step}")


def resolve_tag(cfg: RunConfig, which: str) -> str:
    """The checkpoint tag that `latest` (or a named tag) stands for; FileNotFoundError when there is none."""
    root = checkpoint_dir(cfg)
    if which == "latest":
        if not (root / "latest").exists():
            raise FileNotFoundError(f"--resume latest: no checkpoint under {root}")
        which = (root / "latest").read_text().strip()
    if not (root / which).is_dir():
        raise FileNotFoundError(f"--resume {which}: no checkpoint {root / which}")
    return which


def read_state(folder: Path) -> dict:
    """The run state (step, stage, ranks, ...) saved beside a checkpoint."""
    return json.loads((Path(folder) / STATE).read_text())


def step_of(cfg: RunConfig, which: str) -> int:
    """The step a checkpoint (`latest` or a tag) was taken after."""
    return int(read_state(checkpoint_dir(cfg) / resolve_tag(cfg, which))["step"])


class Checkpointer:
    """Saves and restores a run: the engine, the export, the run state, and every registered part (an object with
    state_dict() / load_state_dict(), see x2vlm.train.state), restored in the order they were registered."""

    def __init__(self, engine, cfg: RunConfig, layout: dict):
        """`layout`: what the saved data positions depend on ({"world_size", "num_workers"})."""
        self.engine, self.cfg, self.layout = engine, cfg, layout
        self.root = checkpoint_dir(cfg)
        self.parts: dict = {}

    def register(self, name: str, part) -> None:
        self.parts[name] = part

    def save(self, step: int, run_state: dict) -> Path:
        """Checkpoint `step{N}` (all ranks take part); see the module docstring. With train.keep_last = K > 0,
        checkpoints older than the newest K are deleted afterwards."""
        tag = f"step{step}"
        partial = self.root / (tag + PARTIAL)
        if distributed.is_main() and partial.exists():
            shutil.rmtree(partial)
        distributed.barrier()
        state = {"step": step, **self.layout, **run_state}
        self.engine.save_checkpoint(str(self.root), tag=partial.name,
                                    client_state={**state, "config": to_dict(self.cfg)}, save_latest=False)
        partial.mkdir(parents=True, exist_ok=True)
        mine = {name: part.state_dict() for name, part in self.parts.items()}
        (partial / RANK_STATE.format(distributed.rank())).write_text(json.dumps(mine))
        weights = full_state_dict(self.engine)
        if weights is not None:
            export_weights(weights, self.cfg, partial, self.cfg.model.text.tokenizer)
            (partial / STATE).write_text(json.dumps(state, indent=1))
        distributed.barrier()
        if distributed.is_main():
            final = self.root / tag
            if final.exists():  # the same step saved again (a resumed run that repeats a step)
                shutil.rmtree(final)
            os.replace(partial, final)
            write_latest(self.root, tag)
            prune(self.root, self.cfg.train.keep_last, keep=tag)
        distributed.barrier()
        return self.root / tag

    def restore(self, which: str) -> dict:
        """Load `latest` or a named tag: the engine (re-sharded when the checkpoint has another number of ranks),
        then every part. With the saved layout each part takes this rank's saved state; with another layout each
        part that can continues from all old ranks' states (`load_other_layout`), the others start afresh.
        Returns the run state."""
        tag = resolve_tag(self.cfg, which)
        folder = self.root / tag
        state = read_state(folder)
        if state.get("world_size", self.layout["world_size"]) != self.layout["world_size"]:
            reshard.load_resharded(self.engine, folder)
        else:
            reshard.load_weights_only(self.engine)
            path, _ = self.engine.load_checkpoint(str(self.root), tag=tag)
            if path is None:
                raise FileNotFoundError(f"--resume {tag}: nothing loaded from {folder}")
        self.verify_loaded(folder)
        mine = folder / RANK_STATE.format(distributed.rank())
        same = all(state.get(k) == v for k, v in self.layout.items())
        if same and mine.exists():
            saved = json.loads(mine.read_text())
            for name, part in self.parts.items():
                part.load_state_dict(saved[name])
            return state
        states = [json.loads(p.read_text()) for p in sorted(folder.glob(RANK_STATE.format("*")))]
        notes = {name: part.load_other_layout([s[name] for s in states if name in s])
                 for name, part in self.parts.items() if hasattr(part, "load_other_layout")}
        log.info(f"resuming {state.get('world_size')} rank(s) x {state.get('num_workers')} loader worker(s) as "
                 f"{self.layout['world_size']} x {self.layout['num_workers']}: weights, optimiser state and "
                 f"schedule continue exactly; the data streams start at new epochs {notes.get('data')} (the rest of "
                 f"the interrupted epochs is not read) and the random generators are seeded anew, so the run no "
                 f"longer matches an uninterrupted one bit for bit")
        return state

    def verify_loaded(self, folder: Path) -> None:
        """The weights now in the engine must equal the export written with the checkpoint, bit for bit."""
        from safetensors.torch import load_file

        current = full_state_dict(self.engine)
        if current is None:
            return
        if not (folder / WEIGHTS).exists():
            log.info(f"resumed from {folder.name} (no {WEIGHTS} beside it to check the weights against)")
            return
        saved = load_file(str(folder / WEIGHTS))
        differ = [k for k, v in saved.items() if k not in current or not torch.equal(current[k], v)]
        if differ or set(current) != set(saved):
            raise RuntimeError(f"resumed weights differ from {folder / WEIGHTS}: {differ[:5]}")
        log.info(f"resumed from {folder.name}: {len(saved)} tensors equal to the saved export")
