"""Approximate keyframe-mode reading (pyav) and re-encoding with keyframes at chosen times."""
import io
from fractions import Fraction

import av
import numpy as np
import pytest

from video.backends import PyAVReader
from video.decode import VideoDecodeError, available_backends, read_clip, read_video
from video.encode import encode_video, reencode
from video.indexcode import index_frame, read_index
from video.sampling import frame_index_at

FPS = 10


def indexed(n: int, **kw) -> bytes:
    return encode_video([index_frame(i) for i in range(n)], fps=FPS, threads=1, **kw)


def shown(frames) -> list:
    return [read_index(f) for f in frames]


def packets(data: bytes) -> tuple[list, list]:
    """(presentation times in seconds from the first frame, keyframe times), in display order."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        pk = [(p.pts, p.is_keyframe) for p in c.demux(s) if p.size]
        tb = float(s.time_base)
    first = min(p for p, _ in pk)
    return (sorted(round((p - first) * tb, 4) for p, _ in pk),
            sorted(round((p - first) * tb, 4) for p, k in pk if k))


@pytest.fixture(scope="module")
def gop1():
    return indexed(95, gop=FPS)  # 9.5 s, a keyframe every second: frames 0, 10, 20, ...


@pytest.fixture()
def decode_calls(monkeypatch):
    """Display indices passed to the exact decoder and to the keyframe decoder, per call."""
    calls = {"exact": [], "keyframes": []}
    exact, keyframes = PyAVReader._decode_exact, PyAVReader._decode_keyframes

    def spy_exact(self, wanted):
        calls["exact"].append(list(wanted))
        return exact(self, wanted)

    def spy_keyframes(self, wanted):
        calls["keyframes"].append(sorted(wanted))
        return keyframes(self, wanted)

    monkeypatch.setattr(PyAVReader, "_decode_exact", spy_exact)
    monkeypatch.setattr(PyAVReader, "_decode_keyframes", spy_keyframes)
    return calls


def test_keyframes_within_tolerance_decoded_alone(gop1, decode_calls):
    clip = read_clip(gop1, max_frames=None, seek="keyframe", keyframe_tolerance=0.5)
    assert clip.times == [k + 0.5 for k in range(9)] and clip.seek == "keyframe"
    idx = shown(clip.frames)
    assert all(i % FPS == 0 for i in idx)  # keyframes only
    np.testing.assert_allclose(clip.shown, np.asarray(idx) / FPS)  # shown: each frame's own start
    assert clip.time_error.max() <= 0.5 + 1e-9 and clip.time_error.mean() == pytest.approx(0.5)
    assert decode_calls["exact"] == [[]] and len(decode_calls["keyframes"]) == 1  # nothing decoded exactly


def test_no_keyframe_near_equals_exact(gop1, decode_calls):
    exact = read_clip(gop1, max_frames=None)
    approx = read_clip(gop1, max_frames=None, seek="keyframe", keyframe_tolerance=0.3)  # keys are 0.5 s away
    np.testing.assert_array_equal(approx.frames, exact.frames)
    np.testing.assert_array_equal(approx.shown, exact.shown)
    assert shown(exact.frames) == [int(t * FPS) for t in exact.times]
    assert decode_calls["keyframes"] == []


def test_mixed_near_and_far_samples(gop1):
    clip = read_clip(gop1, fps=4.0, max_frames=None, seek="keyframe", keyframe_tolerance=0.2)
    exact = [int(np.floor(t * FPS + 1e-9)) for t in clip.times]
    near = 0
    for t, i, err in zip(clip.times, shown(clip.frames), clip.time_error):
        key = round(t)  # keyframes at whole seconds
        if abs(key - t) <= 0.2:
            near += 1
            assert i == key * FPS and err == pytest.approx(abs(key - t))
        else:
            assert i == exact[clip.times.index(t)]
    assert 0 < near < len(clip.times)


def test_keyframe_mode_on_mpegts_and_default_gop():
    data = indexed(47, container="mpegts", gop=12, pts=[14 + i for i in range(47)], time_base=Fraction(1, FPS))
    clip = read_clip(data, fps=2.0, max_frames=None, seek="keyframe", keyframe_tolerance=0.3)
    for t, i in zip(clip.times, shown(clip.frames)):
        nearest = min((k for k in range(0, 47, 12)), key=lambda k: abs(k / FPS - t))
        assert i == (nearest if abs(nearest / FPS - t) <= 0.3 else int(np.floor(t * FPS + 1e-9)))
    data = indexed(40)  # libx264's default keyframe interval: only frame 0 is a keyframe
    clip = read_clip(data, max_frames=None, seek="keyframe", keyframe_tolerance=0.5)
    assert shown(clip.frames) == [0, 15, 25, 35]  # 0.5 s takes the keyframe at 0 (tolerance inclusive)


def test_keyframe_mode_where_frames_are_counted_equals_exact():
    data = indexed(47, container="avi", codec="libx264", gop=12)  # AVI: no presentation times, B-frames
    exact = read_clip(data, fps=3.0, max_frames=None)
    approx = read_clip(data, fps=3.0, max_frames=None, seek="keyframe", keyframe_tolerance=1.0)
    np.testing.assert_array_equal(approx.frames, exact.frames)
    assert shown(exact.frames) == [int(np.floor(t * FPS + 1e-9)) for t in exact.times]


def test_seek_arguments_checked(gop1):
    with pytest.raises(ValueError, match="seek"):
        read_video(gop1, seek="fast")
    with pytest.raises(ValueError, match="keyframe_tolerance"):
        read_video(gop1, seek="keyframe", keyframe_tolerance=-1)
    for backend in available_backends():
        if backend != "pyav":
            with pytest.raises(ValueError, match="pyav"):
                read_video(gop1, seek="keyframe", backend=backend)


# -- re-encoding --------------------------------------------------------------------------------------------
def test_reencode_places_keyframes_and_keeps_frames():
    data = indexed(95)  # one keyframe
    out = reencode(data, gop_seconds=1.0)
    times, keys = packets(out)
    assert times == packets(data)[0] and len(times) == 95
    assert keys == [0.0] + [k + 0.5 for k in range(9)]  # the frames 1-fps sampling picks
    with av.open(io.BytesIO(out)) as c:
        assert shown(f.to_ndarray(format="rgb24") for f in c.decode(video=0)) == list(range(95))
    for kw in (dict(max_frames=None), dict(max_frames=4), dict(max_frames=4, train=True)):
        exact = read_clip(out, rng=np.random.default_rng(0), **kw)
        approx = read_clip(out, seek="keyframe", keyframe_tolerance=0.5, rng=np.random.default_rng(0), **kw)
        assert approx.times == exact.times and approx.time_error.max() == 0  # keyframes at the sample times
        np.testing.assert_array_equal(approx.frames, exact.frames)
        assert shown(exact.frames) == [int(t * FPS) for t in exact.times]
    out = reencode(data, gop_seconds=2.0, phase=0.0)
    assert packets(out)[1] == [0.0, 2.0, 4.0, 6.0, 8.0]


def test_reencode_keeps_variable_frame_rate_and_offsets():
    pts = [0, 90, 130, 700, 720, 1450, 2480, 2510, 2990, 3050, 3960]
    data = encode_video([index_frame(i) for i in range(len(pts))], pts=[p + 1400 for p in pts],
                        time_base=Fraction(1, 1000), container="mpegts", threads=1)
    for container, codec in (("mp4", "libx264"), ("webm", "libvpx-vp9")):
        out = reencode(data, gop_seconds=1.0, container=container, codec=codec)
        times, keys = packets(out)
        assert times == [p / 1000 for p in pts]  # counted from the first frame
        starts = np.asarray(times)
        assert keys == sorted({0.0, *(starts[frame_index_at(starts, [0.5, 1.5, 2.5, 3.5])].tolist())})


def test_reencode_bad_input():
    with pytest.raises(VideoDecodeError):
        reencode(b"not a video")
    with pytest.raises(ValueError):
        reencode(indexed(10), gop_seconds=0)
