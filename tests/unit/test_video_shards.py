"""Video shards: round trip in both forms, damaged samples skipped and counted."""
import io

import av
import numpy as np
import pytest

from video.decode import VideoDecodeError
from video.encode import encode_video
from video.indexcode import index_frame, read_index
from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.samples import ClipDecoder, write_video_shards


def iterate_video_samples(shards, skipped=None, **sampling):
    """Decoded clips of video shards in order (sampling: fps, max_frames, min_frames)."""
    return iterate_samples(shards, ClipDecoder(**sampling), skipped)


def clip(n: int, fps: float = 10) -> bytes:
    return encode_video([index_frame(i) for i in range(n)], fps=fps, threads=1)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "on_disk.mp4"
    path.write_bytes(clip(25))
    return [{"key": "a", "video": clip(45), "json": {"caption": "first", "qa": [{"question": "q", "answer": "x"}]}},
            {"key": "b", "video": str(path), "json": {"caption": "from a file"}},
            {"key": "c", "video": clip(8), "json": {"caption": "short"}}]


@pytest.mark.parametrize("form", ["mp4", "frames"])
def test_round_trip(tmp_path, samples, form):
    paths = write_video_shards(samples, str(tmp_path), "vid", per_shard=2, form=form)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["vid-000000.tar", "vid-000001.tar"]
    skipped = {}
    out = list(iterate_video_samples(str(tmp_path), max_frames=None, skipped=skipped))
    assert skipped == {}
    assert [s["key"] for s in out] == ["a", "b", "c"]
    assert [s["json"] for s in out] == [s["json"] for s in samples]
    assert [s["timestamps"] for s in out] == [[0.5, 1.5, 2.5, 3.5], [0.5, 1.5], [0.5]]
    for s in out:
        assert s["frames"].dtype == np.uint8 and s["frames"].shape[1:] == (64, 64, 3)
        assert [read_index(f) for f in s["frames"]] == [int(t * 10) for t in s["timestamps"]]
    # max_frames / min_frames apply to both forms with the same rule
    a, b, c = iterate_video_samples(paths, max_frames=2, min_frames=2)
    assert a["timestamps"] == [1.5, 3.5] and b["timestamps"] == [0.5, 1.5] and c["timestamps"] == [0.5, 0.5]
    assert [read_index(f) for f in a["frames"]] == [15, 35]


def test_frames_form_needs_its_fps(tmp_path, samples):
    write_video_shards(samples[:1], str(tmp_path), "vid", per_shard=4, form="frames", fps=1.0)
    with pytest.raises(ValueError, match="fps"):
        list(iterate_video_samples(str(tmp_path), fps=2.0))


def test_damaged_samples_are_skipped_and_counted(tmp_path, samples):
    audio = io.BytesIO()
    with av.open(audio, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="flt", layout="mono")
        frame.sample_rate = 16000
        for p in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(p)
    good = samples[0]["video"]
    bad = [{"key": "corrupt", "video": b"\x00\x01not a video" * 50, "json": {"caption": "x"}},
           {"key": "truncated", "video": good[:len(good) // 2], "json": {"caption": "x"}},
           {"key": "empty", "video": b"", "json": {"caption": "x"}},
           {"key": "audio", "video": audio.getvalue(), "json": {"caption": "x"}}]
    write_video_shards([samples[0]] + bad + [samples[2]], str(tmp_path), "mp4form", per_shard=3)
    skipped = {}
    keys = [s["key"] for s in iterate_video_samples(str(tmp_path / "mp4form-*.tar"), skipped=skipped)]
    assert keys == ["a", "c"] and skipped == {"video_decode": 4}

    with pytest.raises(VideoDecodeError):  # the frames form decodes at write time: loud unless asked to count
        write_video_shards(bad[:1], str(tmp_path), "strict", per_shard=3, form="frames")
    counted = {}
    write_video_shards([samples[0]] + bad, str(tmp_path), "framesform", per_shard=3, form="frames", skipped=counted)
    assert counted == {"video_decode": 4}
    assert [s["key"] for s in iterate_video_samples(str(tmp_path / "framesform-*.tar"))] == ["a"]

    # a truncated shard and a sample with broken JSON are counted as well; no dict -> a warning per skip
    shard = tmp_path / "mp4form-000000.tar"
    cut = tmp_path / "cut-000000.tar"
    cut.write_bytes(shard.read_bytes()[:2000])
    skipped = {}
    assert list(iterate_video_samples(str(cut), skipped=skipped)) == [] and skipped == {"bad_shard": 1}
    with pytest.warns(UserWarning, match="video_decode"):
        assert [s["key"] for s in iterate_video_samples(str(shard))] == ["a"]


def test_bad_json_is_counted(tmp_path):
    import webdataset as wds

    path = tmp_path / "raw-000000.tar"
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as w:
        w.write({"__key__": "x", "mp4": clip(10), "json": b"{not json"})
        w.write({"__key__": "y", "json": b"{}"})
        w.write({"__key__": "z", "mp4": clip(10), "json": b"[1, 2]"})
    skipped = {}
    assert list(iterate_video_samples(str(path), skipped=skipped)) == []
    assert skipped == {"bad_json": 2, "missing_video": 1}
