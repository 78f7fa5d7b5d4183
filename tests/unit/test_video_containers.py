"""Every backend on every container: clips written with PyAV (and, where the ffmpeg CLI is installed, with
ffmpeg itself) from frames that show their own index; each backend must return the frame on screen at every
sample time, or refuse the clip with VideoDecodeError. Where ffmpeg and ffprobe are installed, the expected
frames also come from them (every frame decoded in order, with FFmpeg's own timestamps)."""
import shutil
import subprocess
from fractions import Fraction
from functools import lru_cache

import numpy as np
import pytest

from video.backends import avi_video_slots, open_reader, sniff_container
from video.decode import VideoDecodeError, available_backends, read_video
from video.encode import encode_video
from video.indexcode import index_frame, read_index
from video.sampling import frame_index_at, sample_timestamps, timeline_duration

BACKENDS = available_backends()
FPS, N, GOP = 10, 47, 12  # constant-rate clips: 4.7 s, a keyframe every 1.2 s, B-frames where the codec has them
VFR_MS = [0, 90, 130, 700, 720, 1450, 2480, 2510, 2990, 3050, 3960, 4020, 4100, 4700, 4790]  # presentation times
AVI_SLOTS = [0, 1, 2, 5, 6, 9, 10, 11, 15, 16, 17, 20, 21, 22, 26]  # AVI frame slots at 10 fps, some skipped

# name: (encode_video arguments, presentation time of frame i in seconds)
CASES = {
    "mp4_h264": (dict(container="mp4", codec="libx264", gop=GOP), None),
    "mkv_h264": (dict(container="matroska", codec="libx264", gop=GOP), None),
    # open GOPs: B-frames after a keyframe in decode order are shown before it and refer to the previous GOP
    "mkv_h264_open_gop": (dict(container="matroska", codec="libx264",
                               options={"x264-params": f"open-gop=1:keyint={GOP}:min-keyint={GOP}:scenecut=0"}),
                          None),
    "mov_h264": (dict(container="mov", codec="libx264", gop=GOP), None),
    "webm_vp8": (dict(container="webm", codec="libvpx", gop=GOP), None),
    "webm_vp9": (dict(container="webm", codec="libvpx-vp9", gop=GOP), None),
    "avi_mpeg4": (dict(container="avi", codec="mpeg4", gop=GOP), None),
    "avi_mpeg4_bframes": (dict(container="avi", codec="mpeg4", gop=GOP, options={"bf": "2"}), None),
    "avi_h264": (dict(container="avi", codec="libx264", gop=GOP), None),
    # MPEG-TS starting at 1.4 s, as ffmpeg writes it
    "ts_h264": (dict(container="mpegts", codec="libx264", gop=GOP, pts=[14 + i for i in range(N)],
                     time_base=Fraction(1, FPS)), [1.4 + i / FPS for i in range(N)]),
    "mp4_h264_vfr": (dict(container="mp4", codec="libx264", gop=4, pts=VFR_MS, time_base=Fraction(1, 1000)),
                     [p / 1000 for p in VFR_MS]),
    "mkv_vp9_vfr": (dict(container="matroska", codec="libvpx-vp9", gop=4, pts=VFR_MS,
                         time_base=Fraction(1, 1000)), [p / 1000 for p in VFR_MS]),
    "avi_mpeg4_vfr": (dict(container="avi", codec="mpeg4", gop=4, pts=AVI_SLOTS, time_base=Fraction(1, FPS)),
                      [s / FPS for s in AVI_SLOTS]),
    # AVI keeps no presentation times: reordered (B-frame) H.264 at an irregular rate has lost its frame times
    "avi_h264_vfr": (dict(container="avi", codec="libx264", gop=4, pts=AVI_SLOTS, time_base=Fraction(1, FPS)),
                     None),
}
REFUSED = {
    "pyav": {"avi_h264_vfr"},
    "decord": {"ts_h264", "avi_h264_vfr", "mkv_h264_open_gop",
               "mp4_cut"},  # mp4_cut: decord gives the frames that the edit list discards no times
    "torchcodec": {"ts_h264", "avi_h264", "avi_h264_vfr", "avi_mpeg4_bframes"},
}
UNKNOWN_TIMES = {"avi_h264_vfr"}


@lru_cache(maxsize=None)
def clip(name: str) -> tuple[bytes, np.ndarray]:
    """(video bytes, true start time of each frame in seconds from the first frame)."""
    kw, times = CASES[name]
    n = len(kw["pts"]) if "pts" in kw else N
    data = encode_video([index_frame(i) for i in range(n)], fps=FPS, threads=1, **kw)
    starts = np.asarray(times if times is not None else [i / FPS for i in range(n)], dtype=np.float64)
    return data, np.round(starts - starts[0], 6)


def expected(starts, times) -> list:
    return frame_index_at(starts, times).tolist()


def shown(frames) -> list:
    return [read_index(f) for f in frames]


def probe_times(duration: float) -> list:
    """Frame boundaries of the 10 fps clips and times between them."""
    grid = set(np.round(np.arange(0.0, duration, 0.1), 4)) | set(np.round(np.arange(0.03, duration, 0.23), 4))
    return sorted(float(t) for t in grid if t < duration)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_frames_or_refused(backend, name):
    data, starts = clip(name)
    if name in REFUSED.get(backend, ()):
        with pytest.raises(VideoDecodeError):
            read_video(data, fps=2.0, max_frames=None, backend=backend)
        return
    assert name not in UNKNOWN_TIMES
    for fps in (1.0, 3.0):
        frames, times = read_video(data, fps=fps, max_frames=None, backend=backend)
        assert shown(frames) == expected(starts, times), (fps, times)
        if backend != "torchcodec" or not name.endswith("vfr"):
            # one rule for the clip's length (video.sampling.timeline_duration); torchcodec's differs on VFR
            assert times == sample_timestamps(timeline_duration(starts), fps, None)
    reader = open_reader(backend, data)
    try:
        times = probe_times(timeline_duration(starts))
        frames, at = reader.read_at(times)
    finally:
        reader.close()
    want = expected(starts, times)
    assert shown(frames) == want
    np.testing.assert_allclose(at, starts[want], atol=1e-3)  # the start time of each returned frame


def test_container_sniffing_and_avi_slots():
    assert sniff_container(clip("ts_h264")[0][:4096]) == "mpegts"
    assert sniff_container(clip("avi_mpeg4")[0][:4096]) == "avi"
    assert sniff_container(clip("mp4_h264")[0][:4096]) is None
    assert sniff_container(b"\x00\x00\x01\xba" + bytes(100)) == "mpegps"
    assert avi_video_slots(clip("avi_mpeg4")[0][:65536]) == N
    assert avi_video_slots(clip("avi_mpeg4_vfr")[0][:65536]) == AVI_SLOTS[-1] + 1  # skipped slots counted
    assert avi_video_slots(clip("mp4_h264")[0][:65536]) is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_give_the_same_frames(backend):
    for name in ("mp4_h264", "ts_h264", "avi_h264"):
        if name in REFUSED.get(backend, ()):
            continue
        data, starts = clip(name)
        frames, times = read_video(data, fps=3.0, max_frames=None, backend=backend, threads=2)
        assert shown(frames) == expected(starts, times)


# -- FFmpeg itself as the reference ---------------------------------------------------------------------------
FFMPEG = shutil.which("ffmpeg") and shutil.which("ffprobe")
needs_ffmpeg = pytest.mark.skipif(not FFMPEG, reason="ffmpeg/ffprobe not installed")


def ffmpeg_frames(path) -> tuple[list, np.ndarray]:
    """(index shown by every frame ffmpeg decodes, in order; its timestamps from ffprobe, from the first)."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough",
                          "-f", "rawvideo", "-pix_fmt", "rgb24", "-"], capture_output=True, check=True).stdout
    frames = np.frombuffer(raw, np.uint8).reshape(-1, 64, 64, 3)
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
                          "frame=best_effort_timestamp_time", "-of", "csv=p=0", str(path)],
                         capture_output=True, check=True, text=True).stdout
    ts = [line.strip().rstrip(",") for line in out.split()]
    known = [float(t) for t in ts if t != "N/A"]
    assert len(ts) == len(frames) and ts[:len(known)] == [t for t in ts if t != "N/A"]  # only the last may lack one
    step = float(np.median(np.diff(known)))
    ts = np.asarray(known + [known[-1] + step * (k + 1) for k in range(len(ts) - len(known))])  # as ffmpeg guesses
    assert np.all(np.diff(ts) > 0)
    return shown(frames), np.round(ts - ts[0], 6)


def ffmpeg_written(ext: str, tmp_path, cut: float = 0.0) -> object:
    """A clip written by the ffmpeg CLI with its default muxer settings (MPEG-TS starts at 1.4 s); with `cut`,
    then cut at that time without re-encoding, as clipping tools do (an mp4 then starts with frames that its
    edit list discards)."""
    path = tmp_path / f"cli.{ext}"
    raw = np.stack([index_frame(i) for i in range(N)]).tobytes()
    subprocess.run(["ffmpeg", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x64", "-r", str(FPS),
                    "-i", "-", "-c:v", "libx264", "-g", str(GOP), "-pix_fmt", "yuv420p", "-y", str(path)],
                   input=raw, check=True)
    if cut:
        whole, path = path, tmp_path / f"cut.{ext}"
        subprocess.run(["ffmpeg", "-v", "error", "-ss", str(cut), "-i", str(whole), "-c", "copy", "-y", str(path)],
                       check=True)
    return path


def check_against_ffmpeg(path, name: str) -> None:
    indices, ts = ffmpeg_frames(path)
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # ffmpeg shows every frame once, in order
    for backend in BACKENDS:
        if name in REFUSED.get(backend, ()):
            with pytest.raises(VideoDecodeError):
                read_video(path, fps=2.0, max_frames=None, backend=backend)
            continue
        frames, times = read_video(path, fps=2.0, max_frames=None, backend=backend)
        assert shown(frames) == [indices[i] for i in expected(ts, times)], backend
        reader = open_reader(backend, path)
        try:
            times = probe_times(timeline_duration(ts))
            frames, _ = reader.read_at(times)
        finally:
            reader.close()
        assert shown(frames) == [indices[i] for i in expected(ts, times)], backend


@needs_ffmpeg
@pytest.mark.parametrize("name", [n for n in CASES if n not in UNKNOWN_TIMES])
def test_pyav_written_clips_match_ffmpeg(name, tmp_path):
    path = tmp_path / "clip.bin"
    path.write_bytes(clip(name)[0])
    check_against_ffmpeg(path, name)


@needs_ffmpeg
@pytest.mark.parametrize("ext,name,cut", [("ts", "ts_h264", 0.0), ("mp4", "mp4_h264", 0.0), ("mkv", "mkv_h264", 0.0),
                                          ("avi", "avi_h264", 0.0), ("mp4", "mp4_cut", 1.75),
                                          ("mkv", "mkv_h264", 1.75), ("ts", "ts_h264", 1.75)])
def test_ffmpeg_written_clips(ext, name, cut, tmp_path):
    path = ffmpeg_written(ext, tmp_path, cut)
    if ext == "ts" and not cut:
        out = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=start_time", "-of", "csv=p=0",
                              str(path)], capture_output=True, text=True, check=True).stdout
        assert float(out) >= 1.4  # the offset the clip's times are counted from
    check_against_ffmpeg(path, name)
