"""Starting `x2vlm` commands under the deepspeed launcher from Python: the demo's runs, and the tests'.

    proc = start(["pretrain", "--config", "run.yaml"], ranks=2, log=Path("pretrain.log"))
    wait([proc])

Each job gets its own master port; its output goes to a log file, and lines that carry "[x2vlm]" (or a
traceback) are echoed to the console, prefixed with the job's name when several run.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from x2vlm.distributed import free_port


def command(args: list, ranks: int, port: int | None = None) -> list:
    """The command line of `deepspeed --num_gpus RANKS --module x2vlm ARGS` (CPU ranks where there is no GPU)."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(port or free_port()), "--module", "x2vlm", *map(str, args)]


def environment(**extra) -> dict:
    """The current environment, with one thread per rank unless set otherwise and unbuffered output."""
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)


@dataclass
class Job:
    name: str
    proc: subprocess.Popen
    echo: threading.Thread
    log: Path


def start(args: list, ranks: int, log: Path, name: str = "", echo: bool = True, env: dict | None = None) -> Job:
    """Start `x2vlm ARGS` under the deepspeed launcher; its output goes to `log` (and the console, see the module
    docstring)."""
    proc = subprocess.Popen(command(args, ranks), env=env or environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    thread = threading.Thread(target=_copy_output, args=(proc, log, f"({name}) " if name else "", echo))
    thread.start()
    return Job(name or Path(log).stem, proc, thread, Path(log))


def wait(jobs: list) -> None:
    """Wait for jobs; RuntimeError with the end of the log of the first that failed."""
    failed = []
    for job in jobs:
        job.echo.join()
        if job.proc.wait() != 0:
            failed.append(job)
    if failed:
        job = failed[0]
        tail = "".join(job.log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{job.name} failed with exit code {job.proc.returncode}; the end of {job.log}:\n{tail}")


def _copy_output(proc: subprocess.Popen, log: Path, prefix: str, echo: bool) -> None:
    with open(log, "w", buffering=1) as f:
        for line in proc.stdout:
            f.write(line)
            at = line.find("[x2vlm]")  # after a progress bar's carriage return, or a rank's prefix
            if echo and (at >= 0 or "Traceback" in line or "Error" in line):
                print(prefix + line[max(at, 0):], end="", flush=True)
