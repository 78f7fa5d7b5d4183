"""Random-state capture and restore: Python's, NumPy's and torch's global generators (and CUDA's), as plain JSON
data, so that a resumed run draws the very numbers an uninterrupted run would have drawn."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


class RandomState:
    """The global generators as a checkpointed part of a run. Restored last, after every other part (loader
    workers, once started, draw no number from them)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)
