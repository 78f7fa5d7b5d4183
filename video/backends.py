"""Decoding backends behind one interface: the exact frames on screen at given times, or VideoDecodeError.

`open_reader(name, source, threads=1)` returns a reader with `duration` (seconds) and
`read_at(times, seek="exact", keyframe_tolerance=0.5)` -> (frames uint8 [N, H, W, 3], shown float64 [N]):
the frame on screen at each time (seconds from the first frame) and the start time of each returned frame.
A backend that cannot place a clip's frames in time exactly refuses the clip instead of guessing.

- "pyav": demuxes the clip once and keeps its packets (the compressed stream, in memory), so that jumping to
  a keyframe is a list index, never a container seek (MPEG-TS seeks land on the wrong keyframe). Frame times
  are the container's presentation times; where the container keeps frames in decode order only (AVI) while
  the decoder reorders them (B-frames), frames are counted from the first keyframe instead, which is exact
  only at a constant frame rate, so an irregular clip of that kind is refused. seek="keyframe" is
  approximate: a sample takes the nearest keyframe within keyframe_tolerance seconds, decoded alone
  (skip_frame NONKEY), else its exact frame.
- "decord": decord's frame times and get_batch. Refuses MPEG-TS and MPEG-PS (decord's seeks there land a
  keyframe off), open-GOP video (it returns wrong frames), and clips whose frame times (checked against the
  container's, read with PyAV) disagree; where decord reports no frame times it reads AVI frame by frame when
  the AVI header shows no skipped frames, and refuses anything else.
- "torchcodec": get_frames_played_at in exact seek mode, each returned frame checked against the time asked.
  Refuses MPEG-TS and MPEG-PS, AVI holding codecs that may reorder frames (torchcodec misplaces them), and
  any clip whose first decoded frame is not where torchcodec's index puts it.
"""
from __future__ import annotations

import bisect
import importlib.util
import io
import os
import struct
from contextlib import closing

import numpy as np

from video.errors import VideoDecodeError
from video.sampling import frame_index_at, frame_starts, timeline_duration

BACKEND_NAMES = ("pyav", "decord", "torchcodec")
SEEK_MODES = ("exact", "keyframe")


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


def _head(buf, path, size: int = 65536) -> bytes:
    if buf is not None:
        return buf.getvalue()[:size]
    with open(path, "rb") as f:
        return f.read(size)


def sniff_container(head: bytes) -> str | None:
    """"mpegts", "mpegps", "avi" or None (anything else) from the first bytes of a file."""
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpegps"
    for offset, stride in ((0, 188), (4, 192)):  # MPEG-TS packets, and the 192-byte packets of M2TS
        if len(head) > offset + 2 * stride and all(head[offset + k * stride] == 0x47 for k in range(3)):
            return "mpegts"
    return None


def avi_video_slots(head: bytes) -> int | None:
    """Length in frame slots of the first video stream of an AVI (strh dwLength; skipped frames included),
    from the headers at the start of the file; None when not found."""
    def walk(i: int, end: int):
        while i + 8 <= end:
            chunk, size = head[i:i + 4], struct.unpack("<I", head[i + 4:i + 8])[0]
            if chunk == b"LIST" and head[i + 8:i + 12] in (b"hdrl", b"strl"):
                found = walk(i + 12, min(end, i + 8 + size))
                if found is not None:
                    return found
            elif chunk == b"LIST" and head[i + 8:i + 12] == b"movi":
                return None
            elif chunk == b"strh" and head[i + 8:i + 12] == b"vids" and i + 44 <= len(head):
                return struct.unpack("<I", head[i + 40:i + 44])[0]  # dwLength, after 8 header bytes + 32
            i += 8 + size + (size & 1)
        return None

    if sniff_container(head) != "avi":
        return None
    return walk(12, len(head))


def _stack(frames: list) -> np.ndarray:
    if len({f.shape for f in frames}) > 1:
        raise VideoDecodeError(f"frames of different sizes in one clip: {sorted({f.shape for f in frames})}")
    return np.stack(frames).astype(np.uint8, copy=False)


def _check_seek(seek: str, keyframe_tolerance: float) -> None:
    if seek not in SEEK_MODES:
        raise ValueError(f"seek: expected one of {', '.join(SEEK_MODES)}, got {seek!r}")
    if not keyframe_tolerance >= 0:
        raise ValueError(f"keyframe_tolerance: expected seconds >= 0, got {keyframe_tolerance!r}")


class _OrderBroken(Exception):
    """Decoded frames disagree with the order the container's timestamps give."""


class _Missed(Exception):
    """A wanted frame did not come out of a decoding run."""


class PyAVReader:
    """Exact frames with PyAV from the clip's packets held in memory (see the module docstring)."""

    def __init__(self, source, threads: int = 1):
        import av
        from av.video.reformatter import VideoReformatter

        buf, path = _source(source)
        self._reformatter = VideoReformatter()  # one colour converter for the clip, not one per frame
        try:
            self.container = av.open(buf if buf is not None else path)
        except Exception as e:  # FFmpeg reports corrupt, truncated or unknown input here
            raise VideoDecodeError(f"cannot open video: {e}") from e
        try:
            self._index(threads)
        except BaseException:
            self.container.close()
            raise

    def _index(self, threads: int) -> None:
        if not self.container.streams.video:
            raise VideoDecodeError("no video stream (audio-only or unknown content)")
        self.stream = stream = self.container.streams.video[0]
        codec = stream.codec_context
        if threads == 1:
            codec.thread_count = 1
        else:  # frame threading; 0 lets FFmpeg choose the number of threads
            codec.thread_type, codec.thread_count = "FRAME", threads
        packets, ts, keys, discard = [], [], [], []
        try:
            for packet in self.container.demux(stream):
                if packet.size == 0:  # carries no frame (the last one marks the end of the stream)
                    continue
                t = packet.pts if packet.pts is not None else packet.dts
                if t is None:
                    raise VideoDecodeError("video packets without timestamps")
                packets.append(packet)
                ts.append(t)
                keys.append(packet.is_keyframe)
                discard.append(packet.is_discard)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot read video packets: {e}") from e
        if not packets:
            raise VideoDecodeError("video stream has no frames")
        first_key = next((i for i, k in enumerate(keys) if k), None)
        if first_key is None:
            raise VideoDecodeError("video stream has no keyframe")
        # Frames the decoder can give: from the first keyframe on (decode order), none shown before it.
        usable = [i for i in range(first_key, len(packets)) if not discard[i] and ts[i] >= ts[first_key]]
        ticks = np.asarray([ts[i] for i in usable], dtype=np.int64)  # [F] decode order
        if np.unique(ticks).size != ticks.size:
            raise VideoDecodeError("two frames of the video stream have the same timestamp")
        self.reordered = bool(np.any(np.diff(ticks) < 0))
        if self.reordered and any(packets[i].pts is None for i in usable):
            raise VideoDecodeError("video frames reordered but some have no presentation time")
        # Container times in decode order while the decoder reorders frames: count frames instead.
        self.mode = "count" if not self.reordered and codec.has_b_frames else "pts"
        gaps = np.diff(ticks)
        self.regular = gaps.size == 0 or int(gaps.max() - gaps.min()) <= max(1, int(0.01 * np.median(gaps)))
        self.packets, self.ts, self.first_key = packets, ts, first_key
        self.decode_positions = np.asarray(usable, dtype=np.int64)  # [F] packet index, decode order
        self.decode_ticks = ticks
        self.ticks = np.sort(ticks)  # [F] display order
        self.display = {int(t): j for j, t in enumerate(self.ticks)}  # ticks -> display index
        self.tb = float(stream.time_base)
        self.starts = frame_starts(self.ticks * self.tb)
        # Open GOPs: a frame decoded after a keyframe but shown before it (it refers to the GOP before).
        self.open_gop, key_t = False, None
        for i in range(first_key, len(packets)):
            if keys[i]:
                key_t = ts[i]
            elif ts[i] < key_t:
                self.open_gop = True
                break
        key_pos = [(ts[i], i) for i in usable if keys[i]]
        key_pos.sort()
        self.key_ticks, self.key_index = [t for t, _ in key_pos], [i for _, i in key_pos]
        rate = stream.average_rate
        self.duration = timeline_duration(self.starts, 1.0 / float(rate) if rate else 0.0)

    def _rgb(self, frame) -> np.ndarray:
        """uint8 [H, W, 3] RGB of a decoded frame, converted in this thread."""
        return self._reformatter.reformat(frame, format="rgb24", threads=1).to_ndarray()

    # -- reading -----------------------------------------------------------------------------------------
    def read_at(self, times, seek: str = "exact", keyframe_tolerance: float = 0.5):
        _check_seek(seek, keyframe_tolerance)
        exact = [int(j) for j in frame_index_at(self.starts, times)]  # display index per time
        picked = list(exact)
        keyed = set()
        if seek == "keyframe" and self.mode == "pts" and self.key_ticks:
            key_disp = np.asarray([self.display[t] for t in self.key_ticks])  # [K] display indices
            key_starts = self.starts[key_disp]
            for n, t in enumerate(np.asarray(times, dtype=np.float64)):
                k = int(np.searchsorted(key_starts, t))
                near = [c for c in (k - 1, k) if 0 <= c < len(key_starts)]
                best = min(near, key=lambda c: (abs(key_starts[c] - t), key_starts[c]))
                if abs(key_starts[best] - t) <= keyframe_tolerance + 1e-9:
                    picked[n] = int(key_disp[best])
                    keyed.add(picked[n])
        try:
            got = self._decode_keyframes(keyed) if keyed else {}
            for n, j in enumerate(picked):  # a keyframe that did not come out alone: that sample is read exactly
                if j not in got and j in keyed:
                    picked[n] = exact[n]
            got.update(self._decode_exact(sorted({j for j in picked if j not in got})))
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e
        finally:
            self.stream.codec_context.skip_frame = "DEFAULT"
        return _stack([got[j] for j in picked]), self.starts[picked].astype(np.float64)

    def _decode_keyframes(self, wanted: set) -> dict:
        """{display index: rgb} for keyframes, each decoded alone with every other frame skipped."""
        codec = self.stream.codec_context
        want = {int(self.ticks[j]): j for j in wanted}
        order = sorted(self.key_index[self.key_ticks.index(t)] for t in want)
        codec.flush_buffers()
        codec.skip_frame = "NONKEY"
        got, frames = {}, []
        for i in order:
            frames += codec.decode(self.packets[i])
        frames += codec.decode(None)
        codec.flush_buffers()
        codec.skip_frame = "DEFAULT"
        for frame in frames:
            if frame.pts in want:
                got[want[frame.pts]] = self._rgb(frame)
        return got

    def _decode_exact(self, wanted: list) -> dict:
        """{display index: rgb} for the wanted display indices (sorted)."""
        if not wanted:
            return {}
        if self.mode == "pts":
            try:
                got = {}
                try:
                    self._runs(wanted, got, fast=True)
                except _Missed:  # decode once more from the first keyframe, nothing skipped
                    try:
                        self._runs([j for j in wanted if j not in got], got, fast=False)
                    except _Missed as e:
                        raise VideoDecodeError(f"frame at {self.starts[e.args[0]]:.3f} s could not be decoded "
                                               "(truncated or corrupt)") from None
                return got
            except _OrderBroken:
                if self.reordered:
                    raise VideoDecodeError("decoded frames disagree with the container's presentation times") from None
                self.mode = "count"  # the decoder reorders frames that the container keeps in decode order
        return self._count(wanted)

    def _runs(self, wanted: list, got: dict, fast: bool) -> None:
        """Decode runs that each start at a keyframe (fast) or one run from the first keyframe (not fast),
        until every wanted frame came out; raises _Missed when one does not."""
        codec = self.stream.codec_context
        targets = {int(self.ticks[j]) for j in wanted}
        pos = expect = last = None  # next packet to feed, next decode-order position expected, last pts out
        for target in sorted(targets):
            if target not in targets:
                continue
            k = bisect.bisect_right(self.key_ticks, target) if fast else 0
            key = self.key_index[k - 1] if k > 0 else self.first_key  # the keyframe at or before the target
            if pos is None or key >= pos:  # the keyframe is ahead of the current run: start a new run there
                codec.flush_buffers()
                pos, last = key, None
                expect = int(np.searchsorted(self.decode_positions, key))
            while target in targets:
                if pos < len(self.packets):
                    packet = self.packets[pos]
                    pos += 1
                    # Frames that no other frame refers to are dropped unless wanted (exact: nothing needs them).
                    skip = fast and self.reordered and self.ts[pos - 1] not in targets
                    codec.skip_frame = "NONREF" if skip else "DEFAULT"
                    frames = codec.decode(packet)
                elif pos == len(self.packets):
                    codec.skip_frame = "DEFAULT"
                    frames, pos = codec.decode(None), len(self.packets) + 1
                else:
                    pos = None
                    raise _Missed(self.display[target])
                for frame in frames:
                    t = frame.pts
                    if t is None or t not in self.display and t >= self.ticks[0]:
                        raise _OrderBroken()
                    if t < self.ticks[0]:  # shown before the first usable frame: not part of the clip
                        continue
                    if last is not None and t <= last:
                        raise _OrderBroken()
                    if not self.reordered:  # decode order is display order: frames come out one after another
                        if expect >= len(self.decode_ticks) or t != self.decode_ticks[expect]:
                            raise _OrderBroken()
                        expect += 1
                    last = t
                    if t in targets:
                        got[self.display[t]] = self._rgb(frame)
                        targets.discard(t)
                if target in targets and last is not None and last > target:
                    pos = None
                    raise _Missed(self.display[target])
        codec.skip_frame = "DEFAULT"

    def _count(self, wanted: list) -> dict:
        """{display index: rgb} for the wanted display indices, decoding every frame from the first keyframe."""
        got, wanted = {}, set(wanted)
        with closing(self.frames()) as frames:
            for j, frame in frames:
                if j in wanted:
                    got[j] = self._rgb(frame)
                    if len(got) == len(wanted):
                        break
        return got

    def frames(self):
        """Every frame of the clip in display order, as (display index, av.VideoFrame), decoded from the first
        keyframe. In count mode the j-th frame out of the decoder is shown at the j-th smallest timestamp:
        exact while frames come out in decode order, or at a constant frame rate; a clip whose reordered
        frames have irregular times is refused (their times are lost)."""
        codec = self.stream.codec_context
        codec.flush_buffers()
        codec.skip_frame = "DEFAULT"
        j, in_order = 0, True
        for packet in self.packets[self.first_key:] + [None]:
            for frame in codec.decode(packet):
                if self.mode == "pts":
                    if frame.pts is not None and frame.pts < self.ticks[0]:
                        continue  # shown before the first usable frame: not part of the clip
                    if self.display.get(frame.pts) != j:
                        raise VideoDecodeError(f"frame {j} of {len(self.ticks)} is missing or out of order")
                else:
                    if j >= len(self.ticks):
                        raise VideoDecodeError("the decoder gave more frames than the container holds")
                    in_order = in_order and frame.pts is not None and frame.pts == self.decode_ticks[j]
                    if not in_order and not self.regular:
                        raise VideoDecodeError("frames reordered in a container without presentation times, at "
                                               "an irregular frame rate: their times are unknown")
                yield j, frame
                j += 1
        if j != len(self.ticks):
            raise VideoDecodeError(f"frame {j} of {len(self.ticks)} could not be decoded (truncated or corrupt)")

    def close(self) -> None:
        self.container.close()


class DecordReader:
    """decord's VideoReader: frame times from decord's own index checked against the container's, one sorted
    get_batch; AVI without frame times read frame by frame (see the module docstring)."""

    def __init__(self, source, threads: int = 1):
        import decord

        buf, path = _source(source)
        head = _head(buf, path)
        kind = sniff_container(head)
        if kind in ("mpegts", "mpegps"):
            raise VideoDecodeError(f"decord cannot read {kind} exactly (its seeks land on the wrong keyframe)")
        probe = PyAVReader(source)  # the container's own frame times, to check decord's against
        probe.close()
        self._open = lambda: decord.VideoReader(io.BytesIO(buf.getvalue()) if buf is not None else path,
                                                ctx=decord.cpu(0), num_threads=max(0, threads))
        try:
            self.vr = self._open()
            n = len(self.vr)
            if n == 0:
                raise VideoDecodeError("video stream has no frames")
            raw = np.asarray(self.vr.get_frame_timestamp(range(n)), dtype=np.float64)[:, 0]
            fps = self.vr.get_avg_fps()
        except VideoDecodeError:
            raise
        except Exception as e:  # decord raises its own error types (and RuntimeError) for bad input
            raise VideoDecodeError(f"cannot open video: {e}") from e
        self.sequential = not (np.all(np.isfinite(raw)) and raw.min() > -1e-3
                               and np.all(np.diff(frame_starts(raw)) > 0))
        if self.sequential:
            # No usable frame times. Counting frames is exact only in an AVI with a frame in every slot.
            if kind != "avi" or not (fps and fps > 0) or avi_video_slots(head) != n:
                raise VideoDecodeError("decord reports no usable frame timestamps for this clip")
            raw = np.arange(n) / fps
        self.starts = frame_starts(raw)
        if len(self.starts) != len(probe.starts) or (
                not self.sequential and np.abs(self.starts - probe.starts).max() > 1e-3):
            raise VideoDecodeError("decord's frames disagree with the container's frame times")
        if probe.open_gop and not self.sequential:  # read frame by frame from the start, an open GOP is fine
            raise VideoDecodeError("decord misplaces frames of open-GOP video (frames shown before their keyframe)")
        self.duration = timeline_duration(self.starts, 1.0 / fps if fps and fps > 0 else 0.0)

    def read_at(self, times, seek: str = "exact", keyframe_tolerance: float = 0.5):
        _check_seek(seek, keyframe_tolerance)
        if seek != "exact":
            raise ValueError("seek='keyframe' is offered by the pyav backend only")
        idx = [int(i) for i in frame_index_at(self.starts, times)]
        uniq = sorted(set(idx))
        try:
            if self.sequential:  # a fresh reader, every frame read in order (decord's skip_frames repeats frames)
                vr, frames = self._open(), {}
                for i in range(uniq[-1] + 1):
                    frame = vr.next()
                    if i in uniq:
                        frames[i] = frame.asnumpy()
                batch = np.stack([frames[i] for i in uniq])
            else:
                batch = self.vr.get_batch(uniq).asnumpy()
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e
        pos = {i: k for k, i in enumerate(uniq)}
        return _stack([batch[pos[i]] for i in idx]), self.starts[idx].astype(np.float64)

    def close(self) -> None:
        del self.vr


# Codecs whose frames torchcodec places right in an AVI: intra-only, or reordering that FFmpeg's parser resolves.
_TORCHCODEC_AVI_CODECS = frozenset({"mpeg4", "mjpeg", "rawvideo", "huffyuv", "ffv1", "png", "dvvideo", "vp8"})


class TorchcodecReader:
    """torchcodec's VideoDecoder in exact seek mode; times are offset by the first frame's presentation time, and
    a clip is refused when torchcodec's frame index disagrees with the frames it decodes."""

    def __init__(self, source, threads: int = 1):
        from torchcodec.decoders import VideoDecoder

        buf, path = _source(source)
        kind = sniff_container(_head(buf, path))
        if kind in ("mpegts", "mpegps"):
            raise VideoDecodeError(f"torchcodec cannot read {kind} exactly (its seeks land on the wrong keyframe)")
        try:
            self.decoder = VideoDecoder(buf.getvalue() if buf is not None else path, seek_mode="exact",
                                        dimension_order="NHWC", num_ffmpeg_threads=max(0, threads))
            meta = self.decoder.metadata
            if kind == "avi" and meta.codec not in _TORCHCODEC_AVI_CODECS:
                raise VideoDecodeError(f"torchcodec cannot place {meta.codec} frames of an AVI in time exactly")
            self.n = int(meta.num_frames or 0)
            if self.n == 0:
                raise VideoDecodeError("video stream has no frames")
            self.begin = float(self.decoder.get_frames_at(indices=[0]).pts_seconds[0])
            if abs(self.begin - float(meta.begin_stream_seconds or 0.0)) > 1e-4:  # e.g. AVI with B-frames
                raise VideoDecodeError("torchcodec's frame index disagrees with the frames it decodes")
            self.end = float(meta.end_stream_seconds)
        except VideoDecodeError:
            raise
        except Exception as e:
            raise VideoDecodeError(f"cannot open video: {e}") from e
        self.duration = round(self.end - self.begin, 4)  # the container's end: its last frame's own duration
        if not self.duration > 0:
            raise VideoDecodeError("video stream has no frames")

    def read_at(self, times, seek: str = "exact", keyframe_tolerance: float = 0.5):
        _check_seek(seek, keyframe_tolerance)
        if seek != "exact":
            raise ValueError("seek='keyframe' is offered by the pyav backend only")
        asked = np.asarray([self.begin + max(float(t), 0.0) + 1e-6 for t in times])  # [N]
        inside = asked < self.end  # at or past the end the last frame is on screen; torchcodec refuses that time
        try:
            parts = []
            if inside.any():
                parts.append(self.decoder.get_frames_played_at(seconds=asked[inside].tolist()))
            if not inside.all():
                parts.append(self.decoder.get_frames_at(indices=[self.n - 1] * int((~inside).sum())))
            frames = np.concatenate([np.asarray(b.data.numpy()) for b in parts]).astype(np.uint8, copy=False)
            pts = np.concatenate([b.pts_seconds.numpy().astype(np.float64) for b in parts])
        except Exception as e:
            raise VideoDecodeError(f"cannot decode video: {e}") from e
        order = np.concatenate([np.flatnonzero(inside), np.flatnonzero(~inside)])
        frames[order], pts[order] = frames.copy(), pts.copy()  # back to the order of `times`
        by_time = np.argsort(asked, kind="stable")
        if np.any(pts > asked + 1e-4) or np.any(np.diff(pts[by_time]) < -1e-6):
            raise VideoDecodeError("torchcodec returned frames that are not on screen at the times asked")
        return np.ascontiguousarray(frames), np.round(pts - self.begin, 4)

    def close(self) -> None:
        del self.decoder


READERS = {"pyav": PyAVReader, "decord": DecordReader, "torchcodec": TorchcodecReader}


def open_reader(name: str, source, threads: int = 1):
    """A reader of `source` (bytes or path) with the named backend. threads: decoding threads (1: none;
    0: the library chooses)."""
    return READERS[name](source, threads=threads)
