"""The GPU check's dry run on CPU ranks, as the README writes it (--full): every kernel matches its reference and
every training configuration trains, checkpoints and resumes; without a GPU and without --allow-cpu it refuses
in one line."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
ENV = {**os.environ, "PYTHON": sys.executable}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run for real")
def test_without_a_gpu_it_refuses_in_one_line():
    p = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=ENV)
    assert p.returncode != 0 and p.stderr.strip().splitlines()[-1].startswith("gpu_check: no GPU here"), p.stderr


@pytest.mark.full
def test_the_readme_dry_run_checks_kernels_and_training():
    args = re.search(r"`(--allow-cpu --preset tiny)` runs it on CPU ranks", (ROOT / "README.md").read_text()).group(1)
    p = subprocess.run(["bash", "scripts/gpu_check.sh", *args.split()], cwd=ROOT, capture_output=True, text=True,
                       timeout=900, env=ENV)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    for kernel, cases in report["kernels"].items():
        for case, impls in cases.items():
            tolerance = 0.05 if "bfloat16" in case else 1e-4
            assert all(r.get("max_abs_diff", 1) <= tolerance for name, r in impls.items() if name != "reference"), (
                kernel, case, impls)
    assert report["training"] and all(r["ok"] and r["resumed"] for r in report["training"].values()), report
