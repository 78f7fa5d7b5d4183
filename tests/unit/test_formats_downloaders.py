"""Shards written by img2dataset and video2dataset, read as they are (no conversion): captions from the json or
the txt member, failed downloads (a json and txt without the media) skipped and counted as such, clip keys with
suffixes, samples out of key order, WebVid's ISO durations; they feed training batches and evaluation."""
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from video.encode import encode_video
from x2vlm.config import DataConfig, LossConfig, SourceConfig
from x2vlm.data.pipeline import build_loader, iterate_samples
from x2vlm.data.samples import ClipDecoder
from x2vlm.data.tokenizer import train_tokenizer
from x2vlm.eval.run import load_captioned_pool


def add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1700000000, 0o644
    tar.addfile(info, io.BytesIO(data))


def jpeg(colour, size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def img2dataset_meta(key, caption, status="success", **extra):
    return {"url": f"https://example.invalid/{key}.jpg", "caption": caption, "key": key, "status": status,
            "error_message": None if status == "success" else "HTTP Error 404", "width": 48, "height": 40,
            "original_width": 480, "original_height": 400, "exif": "{}", "sha256": "0" * 64, **extra}


@pytest.fixture()
def img2dataset_shard(tmp_path):
    """00000.tar as img2dataset writes it: zero-padded keys, jpg + txt + json per sample, not in key order."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key, colour, caption, txt in (("000000002", (200, 0, 0), "a red photo", "a red photo"),
                                          ("000000000", (0, 200, 0), None, "caption from the txt only"),
                                          ("000000001", (0, 0, 200), "a blue photo", "a blue photo"),
                                          ("000000005", (9, 9, 9), "", "")):
            add(tar, f"{key}.jpg", jpeg(colour))
            add(tar, f"{key}.txt", txt.encode())
            add(tar, f"{key}.json", json.dumps(img2dataset_meta(key, caption)).encode())
        add(tar, "000000003.jpg", b"\xff\xd8\xff truncated")  # a broken image
        add(tar, "000000003.txt", b"broken")
        add(tar, "000000003.json", json.dumps(img2dataset_meta("000000003", "broken")).encode())
        add(tar, "000000004.txt", b"a failed one")  # a failure record (written when so asked)
        add(tar, "000000004.json", json.dumps(img2dataset_meta("000000004", "a failed one",
                                                                "failed_to_download")).encode())
        add(tar, "000000006.jpg", jpeg((100, 100, 0)))  # a txt and no json
        add(tar, "000000006.txt", b"only a txt")
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")  # the sibling files are not shards
    (tmp_path / "00000_stats.json").write_text("{}")
    return str(path)


def test_img2dataset_shards(img2dataset_shard, tmp_path):
    counts = {}
    with pytest.warns(UserWarning, match="skipped"):
        got = {s["key"]: s["json"] for s in iterate_samples([img2dataset_shard], skipped=counts)}
    assert counts == {"empty_text": 1, "bad_image": 1, "failed_download": 1}
    assert sorted(got) == ["000000000", "000000001", "000000002", "000000006"]
    assert got["000000000"]["caption"] == "caption from the txt only" and got["000000006"]["caption"] == "only a txt"
    assert got["000000002"]["status"] == "success" and got["000000002"]["original_width"] == 480
    tok = train_tokenizer(["a red photo", "a blue photo", "caption from the txt only"], str(tmp_path / "tok"))
    src = SourceConfig(name="laion", kind="image", shards=[img2dataset_shard], batch_size=3)
    batch = next(iter(build_loader(src, DataConfig(num_workers=0), tok, 32, 16, LossConfig(), seed=0)))
    assert batch["images"].shape == (3, 3, 32, 32) and len(batch["text_ids"]) == 3
    with pytest.warns(UserWarning, match="skipped"):
        images, captions, _, keys = load_captioned_pool([img2dataset_shard], 32)
    assert keys[:3] == ["000000002", "000000000", "000000001"] and captions[1] == ["caption from the txt only"]


def webvid_meta(key, videoid, caption, status="success", **extra):
    return {"videoid": videoid, "page_idx": 3, "page_dir": "1066", "duration": "PT00H00M11S",
            "url": f"https://example.invalid/{videoid}.mp4", "caption": caption, "key": key, "status": status,
            "error_message": None if status == "success" else "HTTP Error 403: Forbidden", "yt_meta_dict": None,
            **extra}


@pytest.fixture()
def video2dataset_shard(tmp_path):
    """00000.tar as video2dataset writes it for WebVid: mp4 + txt + json, clip keys with suffixes, a failed
    download written as txt + json without mp4."""
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[..., 1] = np.arange(6)[:, None, None] * 30
    mp4 = encode_video(frames, fps=2)
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for key, caption in (("000000001_0", "first clip of a video"), ("000000001_1", "second clip of it"),
                             ("000000000", "a whole video")):
            add(tar, f"{key}.mp4", mp4)
            add(tar, f"{key}.txt", caption.encode())
            add(tar, f"{key}.json", json.dumps(webvid_meta(key, "31353427", caption,
                                                           clips=[[0.0, 3.0]])).encode())
        add(tar, "000000002.txt", b"never downloaded")
        add(tar, "000000002.json", json.dumps(webvid_meta("000000002", "14781349", "never downloaded",
                                                          "failed_to_download")).encode())
        add(tar, "000000003.mp4", b"\x00\x00\x00\x18ftypmp42 broken")
        add(tar, "000000003.txt", b"a broken video")
        add(tar, "000000003.json", json.dumps(webvid_meta("000000003", "1", "a broken video")).encode())
        add(tar, "000000004.mp4", mp4)  # caption in the txt only
        add(tar, "000000004.txt", b"caption in the txt")
        add(tar, "000000004.json", json.dumps(webvid_meta("000000004", "2", None)).encode())
    return str(path)


def test_video2dataset_shards(video2dataset_shard, tmp_path):
    counts = {}
    with pytest.warns(UserWarning, match="skipped"):
        clips = {s["key"]: s for s in iterate_samples([video2dataset_shard],
                                                       ClipDecoder(fps=1.0, max_frames=2, needs="caption"), counts)}
    assert counts == {"failed_download": 1, "video_decode": 1}
    assert sorted(clips) == ["000000000", "000000001_0", "000000001_1", "000000004"]
    assert clips["000000001_1"]["json"]["caption"] == "second clip of it"
    assert clips["000000004"]["json"]["caption"] == "caption in the txt"
    assert clips["000000000"]["json"]["duration"] == 11.0  # "PT00H00M11S" in seconds
    assert clips["000000000"]["frames"].shape == (2, 32, 32, 3)
    tok = train_tokenizer(["first clip of a video", "second clip of it", "a whole video"], str(tmp_path / "tok"))
    src = SourceConfig(name="webvid", kind="video", shards=[video2dataset_shard], batch_size=2, max_frames=2)
    batch = next(iter(build_loader(src, DataConfig(num_workers=0), tok, 32, 16, LossConfig(), seed=0)))
    assert batch["videos"].shape[:2] == (2, 2) and len(batch["keys"]) == 2
