"""Metric sinks for the main rank: a console progress bar, a JSONL file and wandb (offline by default)."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("x2vlm")


class Metrics:
    """Receives one dict of numbers per step and sends it to every sink. Only rank 0 makes one."""

    def __init__(self, out_dir: str, total_steps: int, config: dict, wandb_mode: str = "offline",
                 wandb_project: str = "x2vlm", start_step: int = 0, console: bool = True):
        from tqdm import tqdm

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(out_dir) / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_steps, initial=start_step, file=sys.stdout, dynamic_ncols=True,
                        disable=not console, mininterval=2.0)
        self.wandb = None
        if wandb_mode != "disabled":
            self.wandb = _start_wandb(out_dir, config, wandb_mode, wandb_project)

    def log(self, step: int, values: dict) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        shown = {k: record[k] for k in ("loss", "lr", "samples_per_s") if k in record}
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self.bar.n = step
        self.bar.refresh()
        if self.wandb is not None:
            self.wandb.log(record, step=step)

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.wandb.summary[k] = _plain(v)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    return v.item() if hasattr(v, "item") else v


def _start_wandb(out_dir: str, config: dict, mode: str, project: str):
    """wandb in the requested mode. Online without credentials falls back to offline instead of hanging."""
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed; logging to console and JSONL only")
        return None
    if mode == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
        log.warning("wandb online mode has no credentials here; logging offline instead")
        mode = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        return wandb.init(project=project, dir=out_dir, config=config, mode=mode,
                          settings=wandb.Settings(init_timeout=60))
    except Exception as e:  # a dashboard must never stop training
        log.warning(f"wandb could not start ({type(e).__name__}: {e}); continuing without it")
        return None
