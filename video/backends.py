"""Decoding backends behind one small interface.

`open_reader(name, source)` returns a reader with `duration` (seconds) and `read_at(times)` -> uint8
[len(times), H, W, 3], the frames on screen at the given times (seconds from the first frame).
Every failure is raised as VideoDecodeError. Backends:

- "pyav": demuxes the whole file once without decoding (packet timestamps and keyframe flags: about 10 ms for
  1800 packets) to get every frame's presentation time. For each wanted frame it seeks to the keyframe at or
  before it when that keyframe lies beyond what was already decoded (otherwise it keeps decoding forward, which
  is cheaper), and decodes forward until the frame with the wanted presentation time comes out. Packets that are
  not wanted are decoded with skip_frame=NONREF: frames no other frame refers to (most B-frames) are dropped by
  the decoder, which is exact because nothing depends on them. Only the wanted frames are converted to RGB.
- "decord": decord's own frame timestamps and get_batch on sorted unique indices.
- "torchcodec": get_frames_played_at, when the package imports (it needs FFmpeg's shared libraries).
"""
from __future__ import annotations

import bisect
import importlib.util
import io
import os

import numpy as np

from video.errors import VideoDecodeError
from video.sampling import frame_index_at, frame_starts, timeline_duration

BACKEND_NAMES = ("pyav", "decord", "torchcodec")


def backend_importable(name: str) -> bool:
    module = {"pyav": "av", "decord": "decord", "torchcodec": "torchcodec"}[name]
    return importlib.util.find_spec(module) is not None


def _source(source):
    """bytes-like -> (BytesIO, None); path -> (None, str path). Empty input and missing files fail early."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise VideoDecodeError("empty input (zero bytes)")
        return io.BytesIO(data), None
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such video file: {path!r}")
        if os.path.getsize(path) == 0:
            raise VideoDecodeError(f"empty file: {path!r}")
        return None, path
    raise TypeError(f"video source: expected bytes or a path, got {type(source).__name__}")


def _stack(frames: list) -> np.ndarray:
    if len({f.shape for f in frames}) > 1:
        raise VideoDecodeError(f"frames of different sizes in one clip: {sorted({f.shape for f in frames})}")
    return np.stack(frames).astype(np.uint8, copy=False)


class PyAVReader:
    """Sparse, exact decoding with PyAV: packet index, keyframe seeks, non-reference frames skipped."""

    def __init__(self, source):
        import av

        buf, path = _source(source)
        try:
            self.container = av.open(buf if buf is not None else path)
        except Exception as e:  # FFmpeg reports corrupt, truncated or unknown input here
            raise VideoDecodeError(f"cannot open video: {e}") from e
        try:
            self._index()
        except BaseException:
            self.container.close()
            raise

    def _index(self) -> None:
        if not self.container.streams.video:
            raise VideoDecodeError("no video stream (audio-only or unknown content)")
        self.stream = self.container.streams.video[0]
        pts, keys = [], []
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0:  # the empty packet that marks the end of the stream
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    raise VideoDecodeError("video packets without timestamps")
                pts.append(t)
                if packet.is_keyframe:
                    keys.append(t)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot read video packets: {e}") from e
        if not pts:
            raise VideoDecodeError("video stream has no frames")
        if not keys:
            raise VideoDecodeError("video stream has no keyframe")
        self.pts = np.unique(np.asarray(pts, dtype=np.int64))  # display order
        self.keys = sorted(set(keys))
        tb = float(self.stream.time_base)
        self.starts = frame_starts(self.pts * tb)
        rate = self.stream.average_rate
        self.duration = timeline_duration(self.starts, 1.0 / float(rate) if rate else 0.0)

    def read_at(self, times) -> np.ndarray:
        wanted = [int(self.pts[i]) for i in frame_index_at(self.starts, times)]
        try:
            got = self._decode(sorted(set(wanted)))
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e
        return _stack([got[p] for p in wanted])

    def _decode(self, targets: list) -> dict:
        """{pts: rgb array} for the target presentation times (sorted, unique)."""
        codec = self.stream.codec_context
        remaining, got = set(targets), {}
        packets, fed_max, restarted = None, None, False
        while remaining:
            target = min(remaining)
            key = self.keys[max(0, bisect.bisect_right(self.keys, target) - 1)]
            if packets is None or key > fed_max:
                self.container.seek(key, stream=self.stream, backward=True, any_frame=False)
                codec.flush_buffers()
                packets, fed_max, first = self.container.demux(self.stream), None, True
            overshot = False
            for packet in packets:
                if packet.size:
                    t = packet.pts if packet.pts is not None else packet.dts
                    fed_max = t if fed_max is None else max(fed_max, t)
                    codec.skip_frame = "DEFAULT" if t in remaining else "NONREF"
                else:
                    codec.skip_frame = "DEFAULT"
                for frame in codec.decode(packet):
                    if first and frame.pts is not None and frame.pts > target:
                        overshot = True
                    first = False
                    if frame.pts in remaining:
                        got[frame.pts] = frame.to_ndarray(format="rgb24")
                        remaining.discard(frame.pts)
                if target not in remaining or overshot:
                    break
            else:  # end of stream and the target never came out
                packets = None
                if target in remaining:
                    raise VideoDecodeError(f"frame at pts {target} could not be decoded (truncated or corrupt)")
            if overshot:
                # The seek landed after the target (a container whose seek index disagrees with its packets):
                # decode once more from the first keyframe, which is slow but exact.
                if restarted:
                    raise VideoDecodeError(f"frame at pts {target} could not be decoded")
                restarted, packets = True, None
                self.keys = [self.keys[0]]
        codec.skip_frame = "DEFAULT"
        return got

    def close(self) -> None:
        self.container.close()


class DecordReader:
    """decord's VideoReader: frame times from decord's own index, one sorted get_batch."""

    def __init__(self, source):
        import decord

        buf, path = _source(source)
        try:
            self.vr = decord.VideoReader(buf if buf is not None else path, ctx=decord.cpu(0))
            n = len(self.vr)
            if n == 0:
                raise VideoDecodeError("video stream has no frames")
            starts = np.asarray(self.vr.get_frame_timestamp(range(n)), dtype=np.float64)[:, 0]
            fps = self.vr.get_avg_fps()
        except VideoDecodeError:
            raise
        except Exception as e:  # decord raises its own error types (and RuntimeError) for bad input
            raise VideoDecodeError(f"cannot open video: {e}") from e
        self.starts = frame_starts(starts)
        if np.any(np.diff(self.starts) < 0):
            raise VideoDecodeError("decord returned frame times out of order")
        self.duration = timeline_duration(self.starts, 1.0 / fps if fps and fps > 0 else 0.0)

    def read_at(self, times) -> np.ndarray:
        idx = [int(i) for i in frame_index_at(self.starts, times)]
        uniq = sorted(set(idx))
        try:
            batch = self.vr.get_batch(uniq).asnumpy()
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e
        pos = {i: k for k, i in enumerate(uniq)}
        return _stack([batch[pos[i]] for i in idx])

    def close(self) -> None:
        del self.vr


class TorchcodecReader:
    """torchcodec's VideoDecoder in exact seek mode; times are offset by the stream's first presentation time.
    Not exercised where torchcodec is not installed."""

    def __init__(self, source):
        from torchcodec.decoders import VideoDecoder

        buf, path = _source(source)
        try:
            self.decoder = VideoDecoder(buf.getvalue() if buf is not None else path, seek_mode="exact",
                                        dimension_order="NHWC")
            meta = self.decoder.metadata
            self.begin = float(meta.begin_stream_seconds or 0.0)
            end = meta.end_stream_seconds
            self.duration = float(end) - self.begin if end is not None else float(meta.duration_seconds)
        except Exception as e:
            raise VideoDecodeError(f"cannot open video: {e}") from e
        if not self.duration > 0:
            raise VideoDecodeError("video stream has no frames")

    def read_at(self, times) -> np.ndarray:
        last = self.duration - 1e-6
        try:
            batch = self.decoder.get_frames_played_at(seconds=[self.begin + min(max(t, 0.0), last) for t in times])
            return np.ascontiguousarray(batch.data.numpy()).astype(np.uint8, copy=False)
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e

    def close(self) -> None:
        del self.decoder


READERS = {"pyav": PyAVReader, "decord": DecordReader, "torchcodec": TorchcodecReader}


def open_reader(name: str, source):
    """A reader of `source` (bytes or path) with the named backend."""
    return READERS[name](source)
