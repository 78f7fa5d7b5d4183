"""Video decoding: exact frames per backend (bytes and files), the timestamp sampler's rules, variable frame
rate, and one error type for damaged input."""
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from video.decode import DEFAULT_BACKEND, VideoDecodeError, available_backends, read_video, sample_timestamps
from video.encode import encode_video
from video.indexcode import index_frame, read_index
from video.sampling import uniform_indices

BACKENDS = available_backends()


def indexed_clip(n: int, fps: float = 10, **kw) -> bytes:
    return encode_video([index_frame(i) for i in range(n)], fps=fps, threads=1, **kw)


def shown(frames) -> list:
    return [read_index(f) for f in frames]


@pytest.fixture(scope="module")
def clip45():
    return indexed_clip(45)  # 4.5 s at 10 fps


def audio_only(container: str, codec: str) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=16000)
        t = np.arange(8192) / 16000
        for k in range(0, 8192, 1024):
            frame = av.AudioFrame.from_ndarray(np.sin(880 * t[k:k + 1024]).astype(np.float32)[None], format="flt",
                                               layout="mono")
            frame.sample_rate = 16000
            for p in stream.encode(frame):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    return buf.getvalue()


def test_backends_listed():
    assert "pyav" in BACKENDS and "decord" in BACKENDS
    assert BACKENDS[0] == DEFAULT_BACKEND
    with pytest.raises(ValueError, match="backend"):
        read_video(b"x", backend="nope")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("from_file", [False, True])
def test_exact_frames_at_1fps(clip45, tmp_path, backend, from_file):
    source = clip45
    if from_file:
        source = tmp_path / "clip.mp4"
        source.write_bytes(clip45)
    frames, times = read_video(source, fps=1.0, max_frames=None, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (4, 64, 64, 3)
    assert times == [0.5, 1.5, 2.5, 3.5]  # t = 4.5 is the end of the clip, not inside it
    assert shown(frames) == [5, 15, 25, 35]  # frame i is on screen during [i / 10, (i + 1) / 10)
    frames, times = read_video(source, fps=2.0, max_frames=None, backend=backend)
    assert shown(frames) == [int(t * 10) for t in times] and len(times) == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate(backend):
    """Irregular presentation times in a fine time base: the frame picked for t is the last with pts <= t."""
    tb = Fraction(1, 1000)
    pts = [0, 90, 130, 700, 720, 1450, 2480, 2510, 2990, 3050, 3960]
    data = encode_video([index_frame(i) for i in range(len(pts))], pts=pts, time_base=tb, threads=1)
    frames, times = read_video(data, max_frames=None, backend=backend)
    assert times == [0.5, 1.5, 2.5, 3.5]
    expected = [max(i for i, p in enumerate(pts) if p / 1000 <= t) for t in times]
    assert expected == [2, 5, 6, 9]
    assert shown(frames) == expected
    # A constant-rate reading of the same frames (frame index = t * average rate) would pick other frames.
    assert [int(t * len(pts) / 4.0) for t in times] != expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_short_clip_and_min_frames(backend):
    frames, times = read_video(indexed_clip(8), backend=backend)  # 0.8 s
    assert times == [0.5] and shown(frames) == [5]
    frames, times = read_video(indexed_clip(4), backend=backend)  # 0.4 s: no t = k + 0.5 inside, middle instead
    assert times == [0.2] and shown(frames) == [2]
    frames, times = read_video(indexed_clip(25), min_frames=5, backend=backend)  # 2.5 s: samples at 0.5, 1.5
    assert times == [0.5, 0.5, 0.5, 1.5, 1.5] and shown(frames) == [5, 5, 5, 15, 15]


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_frames_thins_uniformly(backend):
    data = indexed_clip(120, fps=8)  # 15 s -> 15 samples at 1 fps
    frames, times = read_video(data, max_frames=5, backend=backend)
    assert times == [1.5, 4.5, 7.5, 10.5, 13.5]  # the middle sample of each stride of 3
    assert shown(frames) == [int(t * 8) for t in times]
    rng = np.random.default_rng(0)
    frames, times = read_video(data, max_frames=5, train=True, rng=rng, backend=backend)
    assert shown(frames) == [int(t * 8) for t in times]


def test_sampler_rules():
    assert sample_timestamps(60.0) == [k + 0.5 for k in range(60)]
    assert sample_timestamps(0.3) == [0.15] and sample_timestamps(0.0) == [0.0]
    assert sample_timestamps(3.0, fps=2.0) == [0.25, 0.75, 1.25, 1.75, 2.25, 2.75]
    assert sample_timestamps(2.0, min_frames=4) == [0.5, 0.5, 1.5, 1.5]
    assert sample_timestamps(60.0, max_frames=4) == [7.5, 22.5, 37.5, 52.5]
    assert uniform_indices(3, min_frames=7) == [0, 0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(200):
        t = sample_timestamps(10.0, max_frames=3, train=True, rng=rng)
        assert len(t) == 3 and t == sorted(t) and all(0 < x < 10.0 for x in t)
        assert all(b - a in (3.0, 4.0) for a, b in zip(t, t[1:]))  # the stride is kept
        seen.add(tuple(t))
    assert len(seen) > 3 and min(t[0] for t in seen) == 0.5 and max(t[-1] for t in seen) == 9.5  # both ends reached
    for bad in (dict(duration=-1.0), dict(duration=float("nan")), dict(duration=5.0, fps=0),
                dict(duration=5.0, max_frames=2, min_frames=3), dict(duration=5.0, min_frames=0)):
        with pytest.raises(ValueError):
            sample_timestamps(**bad)


def damaged_inputs(tmp_path, clip: bytes) -> dict:
    faststart = tmp_path / "faststart.mp4"  # index at the front: a cut file still opens, frames are missing
    with av.open(str(faststart), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        for i in range(45):
            for p in stream.encode(av.VideoFrame.from_ndarray(index_frame(i), format="rgb24")):
                out.mux(p)
        for p in stream.encode():
            out.mux(p)
    whole = faststart.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[:int(len(whole) * 0.6)])
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    return {"corrupt": noise, "corrupt_middle": clip[:800] + noise + clip[4800:], "truncated": clip[:len(clip) // 2],
            "truncated_file": cut, "zero_length": b"", "empty_file": empty,
            "audio_only_mp4": audio_only("mp4", "aac"), "audio_only_mkv": audio_only("matroska", "mp2")}


@pytest.mark.parametrize("backend", BACKENDS)
def test_damaged_input_raises_one_error(tmp_path, clip45, backend):
    for name, source in damaged_inputs(tmp_path, clip45).items():
        with pytest.raises(VideoDecodeError):
            read_video(source, max_frames=None, backend=backend)
            pytest.fail(f"{name}: no error from {backend}")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4", backend=backend)
