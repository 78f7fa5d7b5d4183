"""Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, which must be set before triton is first
imported; so a test file's Triton cases (named test_triton_*) run again in a child pytest with it set."""
import os
import subprocess
import sys


def run_triton_tests_interpreted(test_file: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "test_triton_",
                          test_file], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
