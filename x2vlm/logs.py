"""Console output: the "x2vlm" logger prints "[x2vlm] message" lines on the main rank only, and progress bars
show on the main rank when the output is a terminal.

A record that every rank should print carries `extra={"all_ranks": True}`. Library code only logs; the command
line (and whatever embeds a run) calls `setup()` once.
"""
from __future__ import annotations

import logging
import sys

from x2vlm.distributed import env_rank_world

log = logging.getLogger("x2vlm")


class MainRankOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or env_rank_world()[0] == 0


def setup(level: int = logging.INFO) -> None:
    """Send the x2vlm logger's records to stdout (once; calling again changes nothing)."""
    if any(getattr(h, "_x2vlm", False) for h in log.handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[x2vlm] %(message)s"))
    handler.addFilter(MainRankOnly())
    handler._x2vlm = True
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False


def progress(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar (with its rate) on stderr: shown on the main rank when stderr is a terminal, quiet
    otherwise (logs, files, other ranks)."""
    from tqdm import tqdm

    quiet = env_rank_world()[0] != 0 or not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=quiet,
                mininterval=1.0, dynamic_ncols=True)
