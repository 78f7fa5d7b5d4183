"""Which moments of a clip to show the model: timestamps at a fixed rate, thinned or padded to a frame budget.

Sampling is done in time, never by frame-index arithmetic on an assumed frame rate, so that variable frame rate
files come out right: at `fps` samples per second, sample k is taken at t_k = (k + 0.5) / fps seconds from the
first frame, the middle of the k-th sampling period (at 1 fps: 0.5 s, 1.5 s, 2.5 s, ...). Every t_k < duration
is kept. A clip shorter than half a period has no such t_k and gets one sample, at the middle of the clip, so a
clip shorter than 1 s still yields its frame.

The frame for a time t is the frame on screen at t: the last frame whose presentation time is <= t
(`frame_index_at`).

Budget rules (indices into the fixed-rate list of n timestamps):
- max_frames < n: uniform thinning, sample i at floor((i + offset) * n / max_frames); offset is 0.5 (the
  middle of each stride) for evaluation and uniform in [0, 1) with `train=True`, so every index stays in
  0..n-1 and the stride is kept while the phase varies between epochs.
- min_frames > n: each timestamp is repeated in order, sample i being timestamp floor(i * n / min_frames)
  (nearest-neighbour stretching: [a, b] with min_frames=5 gives [a, a, a, b, b]).
"""
from __future__ import annotations

import math
import random

import numpy as np


def uniform_indices(n: int, max_frames: int | None = None, min_frames: int = 1, train: bool = False,
                    rng=None) -> list[int]:
    """Indices into a list of n fixed-rate samples after thinning to max_frames / padding to min_frames (see
    the module docstring). rng: a numpy Generator or random.Random, used only when train is true and the list
    is thinned; None draws from a fresh unseeded generator."""
    if n < 1:
        raise ValueError(f"n: expected at least one sample, got {n}")
    if min_frames < 1:
        raise ValueError(f"min_frames: expected a positive number, got {min_frames}")
    if max_frames is not None and max_frames < min_frames:
        raise ValueError(f"max_frames ({max_frames}) must be at least min_frames ({min_frames})")
    if max_frames is not None and n > max_frames:
        offset = 0.5
        if train:
            offset = float((rng if rng is not None else random.Random()).random())
        return [min(n - 1, int(math.floor((i + offset) * n / max_frames))) for i in range(max_frames)]
    if n < min_frames:
        return [i * n // min_frames for i in range(min_frames)]
    return list(range(n))


def sample_timestamps(duration: float, fps: float = 1.0, max_frames: int | None = None, min_frames: int = 1,
                      train: bool = False, rng=None) -> list[float]:
    """Sample times in seconds from the first frame for a clip lasting `duration` seconds (see the module
    docstring for the rule, the thinning and the padding)."""
    if not (isinstance(duration, (int, float)) and math.isfinite(duration) and duration >= 0):
        raise ValueError(f"duration: expected a finite number >= 0, got {duration!r}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps: expected a positive number, got {fps!r}")
    period = 1.0 / fps
    n = max(0, math.ceil(duration * fps - 0.5))
    while n > 0 and (n - 0.5) * period >= duration:  # guard against rounding in duration * fps
        n -= 1
    while (n + 0.5) * period < duration:
        n += 1
    times = [(k + 0.5) * period for k in range(n)] or [duration / 2]
    return [times[i] for i in uniform_indices(len(times), max_frames, min_frames, train, rng)]


def frame_index_at(starts, times) -> np.ndarray:
    """For each time, the index of the frame on screen: the last frame whose start (presentation time, sorted
    ascending, seconds from the first frame) is <= t; times before the first frame map to frame 0."""
    starts = np.asarray(starts, dtype=np.float64)
    idx = np.searchsorted(starts, np.asarray(times, dtype=np.float64) + 1e-9, side="right") - 1
    return np.clip(idx, 0, len(starts) - 1)


def frame_starts(times) -> np.ndarray:
    """Frame presentation times as seconds from the first frame, rounded to 0.1 ms: backends that hold times
    as float32 (decord) then agree with exact ones on which side of a sample time a frame falls."""
    times = np.asarray(times, dtype=np.float64)
    return np.round(times - times[0], 4)


def timeline_duration(starts, nominal_frame_duration: float = 0.0) -> float:
    """Length of a clip from its sorted frame start times: the last frame is taken to last as long as the
    median gap between frames (the container's own last-frame duration is not exposed by every backend, and
    one rule for all backends keeps their samples identical); a single frame lasts nominal_frame_duration."""
    starts = frame_starts(starts)
    if len(starts) > 1:
        last = float(np.median(np.diff(starts)))
    else:
        last = float(nominal_frame_duration) if nominal_frame_duration > 0 else 0.0
    return round(float(starts[-1]) + last, 4)
