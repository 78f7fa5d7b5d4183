"""Frames -> compressed video bytes with PyAV (for synthetic data, tests and benchmarks), and re-encoding a clip
with keyframes at chosen times (for fast keyframe-mode reading).

    data = encode_video(frames, fps=8)                          # H.264 in mp4, constant frame rate
    data = encode_video(frames, pts=[0, 40, 55, 300], time_base=Fraction(1, 1000))   # variable frame rate
    data = reencode(clip_bytes, gop_seconds=1.0)                # keyframes at 0.5 s, 1.5 s, 2.5 s, ...

With `pts` every frame gets its own presentation time (in units of `time_base`), which is how a variable frame
rate file is made. `gop=None` keeps the encoder's default keyframe interval (250 frames for libx264).

`reencode` keeps every frame and its presentation time (counted from the first frame) and makes a keyframe of
the frame on screen at each time (k + phase) * gop_seconds: with gop_seconds = 1 / fps and phase 0.5 these are
exactly the frames that 1-fps sampling picks (video.sampling), so seek="keyframe" reads them exactly while
decoding keyframes only. Only the video stream is kept.
"""
from __future__ import annotations

import io
from fractions import Fraction
from itertools import chain

import numpy as np


def _x264_defaults(codec: str, options: dict | None, params: str = "") -> dict:
    """Encoder options; for libx264, `params` and mbtree=0 as x264-params unless the options set x264-params
    (see encode_video for why)."""
    opts = dict(options or {})
    if codec in ("libx264", "h264"):
        opts.setdefault("x264-params", ":".join(p for p in (params, "mbtree=0") if p))
    return opts


def encode_video(frames, fps: float = 8, *, pts=None, time_base: Fraction | None = None, codec: str = "libx264",
                 container: str = "mp4", pix_fmt: str = "yuv420p", gop: int | None = None,
                 options: dict | None = None, threads: int = 0) -> bytes:
    """Encode uint8 [H, W, 3] RGB frames (any iterable) to bytes of `container` format.

    options: encoder options, e.g. {"preset": "ultrafast", "crf": "18"} for libx264. threads: encoder threads,
    0 lets the encoder choose (1 is faster for tiny frames). libx264 runs without its macroblock-tree rate
    control unless `options` say otherwise: with it, the same frames were now and then encoded to different bytes
    (about one encode in four of a 64x64 clip), so data written twice differed."""
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
        rate = Fraction(fps).limit_denominator(1001)
        stream = out.add_stream(codec, rate=rate, options=_x264_defaults(codec, options))
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


def reencode(source, gop_seconds: float = 1.0, *, phase: float = 0.5, codec: str = "libx264",
             container: str = "mp4", options: dict | None = None, threads: int = 0) -> bytes:
    """Re-encode the first video stream of `source` (bytes or path, any container FFmpeg reads) with a keyframe
    at the frame on screen at each time (k + phase) * gop_seconds and at the first frame, and no other
    keyframes; frame count and presentation times (from the first frame) are kept. Raises VideoDecodeError for
    input that does not decode exactly (video.backends).

    options: encoder options (for libx264, scene-cut keyframes are turned off unless given)."""
    import av

    from video.backends import PyAVReader
    from video.sampling import frame_index_at

    if not gop_seconds > 0:
        raise ValueError(f"gop_seconds: expected a positive number, got {gop_seconds!r}")
    if not 0 <= phase < 1:
        raise ValueError(f"phase: expected 0 <= phase < 1, got {phase!r}")
    reader = PyAVReader(source)
    try:
        ticks = reader.ticks - reader.ticks[0]  # [F] display order, in the input's time base
        keys = set(frame_index_at(reader.starts, np.arange(phase * gop_seconds, reader.duration, gop_seconds)).tolist())
        keys.add(0)
        time_base = reader.stream.time_base
        rate = reader.stream.average_rate or reader.stream.guessed_rate or Fraction(25)
        opts = _x264_defaults(codec, options, "scenecut=0")
        if codec in ("libx264", "h264"):
            opts.setdefault("forced-idr", "1")
        buf = io.BytesIO()
        with av.open(buf, "w", format=container) as out:
            stream = None
            for j, frame in reader.frames():
                if stream is None:
                    stream = out.add_stream(codec, rate=rate, options=opts)
                    stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
                    stream.codec_context.thread_count = threads
                    stream.codec_context.gop_size = len(ticks) + 1  # no keyframes but the forced ones
                    stream.codec_context.time_base = time_base
                    stream.time_base = time_base
                frame.pts, frame.time_base = int(ticks[j]), time_base
                frame.pict_type = av.video.frame.PictureType.I if j in keys else av.video.frame.PictureType.NONE
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    finally:
        reader.close()
    return buf.getvalue()
