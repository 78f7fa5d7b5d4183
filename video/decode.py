"""Read a clip as frames sampled in time: `read_video(source, fps=1.0, max_frames=8)`.

    frames, times = read_video(mp4_bytes)            # uint8 [T, H, W, 3], seconds from the first frame
    frames, times = read_video("clip.mp4", max_frames=None, train=True, rng=rng)

Sampling is by timestamps (video.sampling): sample k of a clip is the frame on screen at t = (k + 0.5) / fps,
i.e. at 1 fps the middle of each second, where the frame on screen at t is the last frame whose presentation
time is <= t. `times[i]` is the sample time t of `frames[i]` (not the frame's own presentation time), so the
times of a clip do not depend on its frame rate or on frame-rate changes.

Backends (video.backends): "pyav", "decord" and "torchcodec" where importable; `available_backends()` lists
them, `backend="auto"` uses DEFAULT_BACKEND. Every failure to read a clip (corrupt, truncated, zero-length,
audio-only, a frame that does not decode) raises VideoDecodeError; a missing file raises FileNotFoundError.

Why PyAV is the default, measured with `python scripts/bench_decode.py` on a shared 2-core CPU (two 60 s clips,
30 fps, 320x240, libx264 with its default GOP of 250 frames; medians of 3 runs; two runs of the script), reading
at 1 fps with max_frames=None: PyAV's sparse reader was exact and 1.2-1.8x as fast as PyAV decoding every frame
(converting only the picked frames to RGB), 8.4-9.8x as fast as decoding every frame to RGB; decord was exact and
0.8-1.4x as fast as decoding every frame. With max_frames=8, keyframe seeks skip whole GOPs: PyAV 3.0-4.1x,
decord 1.6x. At 1 fps with 8 s GOPs every GOP holds sampled frames, and an exact frame needs every reference frame
before it in its GOP, so no exact reader can skip much more than the non-reference frames there. decord is also
unmaintained, with known wrong-frame bugs under random access.
"""
from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from video.backends import BACKEND_NAMES, backend_importable, open_reader
from video.errors import VideoDecodeError
from video.sampling import frame_index_at, sample_timestamps, uniform_indices

__all__ = ["DEFAULT_BACKEND", "VideoDecodeError", "available_backends", "frame_index_at", "read_video",
           "sample_timestamps", "uniform_indices"]

DEFAULT_BACKEND = "pyav"


@lru_cache(maxsize=None)
def _available() -> tuple:
    return tuple(name for name in BACKEND_NAMES if backend_importable(name))


def available_backends() -> list[str]:
    """Names of the backends whose library is installed, the default first."""
    names = list(_available())
    if DEFAULT_BACKEND in names:
        names.remove(DEFAULT_BACKEND)
        names.insert(0, DEFAULT_BACKEND)
    return names


def _resolve(backend: str) -> str:
    if backend == "auto":
        names = available_backends()
        if not names:
            raise RuntimeError("no video backend installed: install av (PyAV) or decord")
        return names[0]
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected 'auto' or one of {', '.join(BACKEND_NAMES)}, got {backend!r}")
    if backend not in _available():
        raise RuntimeError(f"video backend {backend!r} is not installed")
    return backend


def read_video_with_duration(source: bytes | str | os.PathLike, fps: float = 1.0, max_frames: int | None = 8,
                             min_frames: int = 1, train: bool = False, rng=None,
                             backend: str = "auto") -> tuple[np.ndarray, list[float], float]:
    """read_video, plus the clip's duration in seconds (video.sampling.timeline_duration)."""
    reader = open_reader(_resolve(backend), source)
    try:
        times = sample_timestamps(reader.duration, fps, max_frames, min_frames, train, rng)
        uniq = sorted(set(times))
        frames = reader.read_at(uniq)
        duration = reader.duration
    finally:
        reader.close()
    pos = {t: i for i, t in enumerate(uniq)}
    return frames[[pos[t] for t in times]], times, duration


def read_video(source: bytes | str | os.PathLike, fps: float = 1.0, max_frames: int | None = 8,
               min_frames: int = 1, train: bool = False, rng=None,
               backend: str = "auto") -> tuple[np.ndarray, list[float]]:
    """Frames sampled at `fps` (uint8 [T, H, W, 3]) and their sample times in seconds.

    source: mp4 (or any container FFmpeg reads) as bytes, or a path. max_frames=None keeps every sample;
    otherwise samples are thinned uniformly, with a random phase when train=True (rng: numpy Generator or
    random.Random). Clips with fewer than min_frames samples repeat frames. See video.sampling for the rules."""
    frames, times, _ = read_video_with_duration(source, fps, max_frames, min_frames, train, rng, backend)
    return frames, times
