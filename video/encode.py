"""Frames -> compressed video bytes with PyAV (for synthetic data, tests and benchmarks).

    data = encode_video(frames, fps=8)                          # H.264 in mp4, constant frame rate
    data = encode_video(frames, pts=[0, 40, 55, 300], time_base=Fraction(1, 1000))   # variable frame rate

With `pts` every frame gets its own presentation time (in units of `time_base`), which is how a variable frame
rate file is made. `gop=None` keeps the encoder's default keyframe interval (250 frames for libx264).
"""
from __future__ import annotations

import io
from fractions import Fraction
from itertools import chain

import numpy as np


def encode_video(frames, fps: float = 8, *, pts=None, time_base: Fraction | None = None, codec: str = "libx264",
                 container: str = "mp4", pix_fmt: str = "yuv420p", gop: int | None = None,
                 options: dict | None = None, threads: int = 0) -> bytes:
    """Encode uint8 [H, W, 3] RGB frames (any iterable) to bytes of `container` format.

    options: encoder options, e.g. {"preset": "ultrafast", "crf": "18"} for libx264. threads: encoder threads,
    0 lets the encoder choose (1 is faster for tiny frames)."""
    import av

    it = iter(frames)
    first = next(it, None)
    if first is None:
        raise ValueError("encode_video: no frames")
    first = np.asarray(first)
    if first.dtype != np.uint8 or first.ndim != 3 or first.shape[2] != 3:
        raise ValueError(f"encode_video: expected uint8 [H, W, 3] frames, got {first.dtype} {first.shape}")
    if pts is not None and time_base is None:
        raise ValueError("encode_video: pts needs a time_base")
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001), options=options or {})
        stream.width, stream.height, stream.pix_fmt = first.shape[1], first.shape[0], pix_fmt
        stream.codec_context.thread_count = threads
        if gop is not None:
            stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.codec_context.time_base = time_base
            stream.time_base = time_base
        for i, frame in enumerate(chain([first], it)):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = int(pts[i]), time_base
            for packet in stream.encode(vf):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
