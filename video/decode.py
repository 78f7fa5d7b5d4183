"""Read a clip as frames sampled in time: `read_video(source, fps=1.0, max_frames=8)`.

    frames, times = read_video(mp4_bytes)            # uint8 [T, H, W, 3], seconds from the first frame
    frames, times = read_video("clip.mp4", max_frames=None, train=True, rng=rng)
    clip = read_clip(mp4_bytes, seek="keyframe")     # + clip.shown, clip.time_error, clip.duration

Sampling is by timestamps (video.sampling): sample k of a clip is the frame on screen at t = (k + 0.5) / fps,
i.e. at 1 fps the middle of each second, where the frame on screen at t is the last frame whose presentation
time is <= t. `times[i]` is the sample time t of `frames[i]` (not the frame's own presentation time), so the
times of a clip do not depend on its frame rate or on frame-rate changes.

seek="exact" (the default) gives exactly those frames. seek="keyframe" (pyav only) is an approximate, faster
mode: a sample takes the keyframe nearest its time when one lies within keyframe_tolerance seconds, decoded
alone, and its exact frame otherwise; `read_clip(...).shown` holds the start time of every returned frame.

Backends (video.backends): "pyav", "decord" and "torchcodec" where importable; `available_backends()` lists
them, `backend="auto"` uses DEFAULT_BACKEND. Every failure to read a clip (corrupt, truncated, zero-length,
audio-only, a frame that does not decode, a clip whose frames a backend cannot place in time exactly) raises
VideoDecodeError; a missing file raises FileNotFoundError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from video.backends import BACKEND_NAMES, SEEK_MODES, backend_importable, open_reader
from video.errors import VideoDecodeError
from video.sampling import frame_index_at, sample_timestamps, uniform_indices

__all__ = ["DEFAULT_BACKEND", "SEEK_MODES", "Clip", "VideoDecodeError", "available_backends", "frame_index_at",
           "read_clip", "read_video", "sample_timestamps", "uniform_indices"]

DEFAULT_BACKEND = "pyav"
DEFAULT_KEYFRAME_TOLERANCE = 0.5  # seconds: at 1 fps a keyframe inside the sample's own second


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


@dataclass
class Clip:
    """A sampled clip: frames uint8 [T, H, W, 3]; times: sample times; shown: start time of each returned frame
    (seconds from the first frame; <= its sample time in exact mode); duration in seconds; the seek mode."""
    frames: np.ndarray
    times: list
    shown: np.ndarray
    duration: float
    seek: str

    @property
    def time_error(self) -> np.ndarray:
        """|shown - time| per frame, in seconds."""
        return np.abs(self.shown - np.asarray(self.times, dtype=np.float64))


def read_clip(source: bytes | str | os.PathLike, fps: float = 1.0, max_frames: int | None = 8,
              min_frames: int = 1, train: bool = False, rng=None, backend: str = "auto", *, seek: str = "exact",
              keyframe_tolerance: float = DEFAULT_KEYFRAME_TOLERANCE, threads: int = 1) -> Clip:
    """read_video with everything it knows: see Clip. threads: decoding threads per clip (1: none)."""
    name = _resolve(backend)
    if seek not in SEEK_MODES:
        raise ValueError(f"seek: expected one of {', '.join(SEEK_MODES)}, got {seek!r}")
    if seek == "keyframe" and name != "pyav":
        raise ValueError(f"seek='keyframe' needs the pyav backend, not {name!r}")
    reader = open_reader(name, source, threads=threads)
    try:
        times = sample_timestamps(reader.duration, fps, max_frames, min_frames, train, rng)
        uniq = sorted(set(times))
        frames, shown = reader.read_at(uniq, seek=seek, keyframe_tolerance=keyframe_tolerance)
        duration = reader.duration
    finally:
        reader.close()
    shown = np.asarray(shown, dtype=np.float64)
    if len(uniq) != len(times):  # repeated sample times (padding to min_frames): repeat their frames
        pos = {t: i for i, t in enumerate(uniq)}
        pick = [pos[t] for t in times]
        frames, shown = frames[pick], shown[pick]
    return Clip(frames, times, shown, duration, seek)


def read_video_with_duration(source: bytes | str | os.PathLike, fps: float = 1.0, max_frames: int | None = 8,
                             min_frames: int = 1, train: bool = False, rng=None, backend: str = "auto",
                             **kw) -> tuple[np.ndarray, list[float], float]:
    """read_video, plus the clip's duration in seconds (video.sampling.timeline_duration)."""
    clip = read_clip(source, fps, max_frames, min_frames, train, rng, backend, **kw)
    return clip.frames, clip.times, clip.duration


def read_video(source: bytes | str | os.PathLike, fps: float = 1.0, max_frames: int | None = 8,
               min_frames: int = 1, train: bool = False, rng=None, backend: str = "auto",
               **kw) -> tuple[np.ndarray, list[float]]:
    """Frames sampled at `fps` (uint8 [T, H, W, 3]) and their sample times in seconds.

    source: any container FFmpeg reads, as bytes or a path. max_frames=None keeps every sample; otherwise
    samples are thinned uniformly, with a random phase when train=True (rng: numpy Generator or random.Random).
    Clips with fewer than min_frames samples repeat frames. See video.sampling for the rules. Keywords: seek
    ("exact" | "keyframe"), keyframe_tolerance (seconds), threads (see read_clip)."""
    clip = read_clip(source, fps, max_frames, min_frames, train, rng, backend, **kw)
    return clip.frames, clip.times
