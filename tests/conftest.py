"""Test-wide settings: one torch thread per test process (tiny models on a loaded 2-core machine run far faster
single-threaded than with threads competing for the cores), and no wandb traffic."""
import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
