"""X-VLM / X2-VLM pre-training JSON lines (image-text, region, video-text) to shards: small files in those formats,
broken lines included; what is skipped is counted by reason, the shards hold what the lines said, and parallel
conversion writes the same bytes as one process."""
import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from x2vlm.data.formats.xvlm import images_to_shards, videos_to_shards
from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.samples import ClipDecoder, decode_image


def jpeg(colour, size=(40, 30), fmt="JPEG"):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture()
def pretrain_files(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "dog.jpg").write_bytes(jpeg((200, 0, 0)))
    (tmp_path / "img" / "vg1.jpg").write_bytes(jpeg((0, 200, 0), (100, 80)))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    image_text = [
        {"binary": b64(jpeg((10, 10, 200))), "desc": "a blue picture"},  # X2-VLM's caption key
        {"binary": b64(jpeg((10, 200, 10), fmt="PNG")), "caption": ["green one", "a green square", " "]},
        {"binary": b64(jpeg((9, 9, 9))), "caption": {"en": "dark", "zh": "暗"}},
        {"image_rpath": "dog.jpg", "caption": "a dog"},
        {"image_rpath": "dog.jpg", "caption": "the same dog again"},  # a repeated image: merged, not an error
        {"binary": "!!!not base64!!!", "caption": "x"},
        {"binary": b64(b"not an image"), "caption": "x"},
        {"image_rpath": "missing.jpg", "caption": "gone"},
        {"image_rpath": "broken.jpg", "caption": "broken"},
        {"caption": "no image at all"},
        {"binary": b64(jpeg((1, 2, 3))), "caption": "   "},
        ["not", "an", "object"],
    ]
    region = [
        {"image_rpath": "vg1.jpg", "elems": [
            {"caption": "a tree", "bb": [10, 10, 30, 20], "attributes": ["tall", "green"]},
            {"caption": ["a road", "the street"], "bb": [0, 50, 100, 30]},
            {"caption": "outside", "bb": [500, 500, 10, 10]},
            {"caption": "", "bb": [1, 1, 5, 5]},
            {"caption": "no box", "bb": [1, 2, 3]}]},
        {"binary": b64(jpeg((50, 50, 50), (64, 64))), "caption": "a grey scene",
         "elems": [{"caption": "a spot", "bb": [4, 4, 8, 8]}]},
        {"image_rpath": "dog.jpg", "elems": [{"caption": "outside", "bb": [900, 900, 5, 5]}]},
    ]
    (tmp_path / "it.jsonl").write_text("\n".join(json.dumps(e, ensure_ascii=False) for e in image_text) + "\n\n")
    (tmp_path / "region.jsonl").write_text("\n".join(json.dumps(e) for e in region))
    return tmp_path


def samples_of(paths, **kw):
    return {s["key"]: s for s in iterate_samples(paths, lambda k, f, r: decode_image(k, f, r, needs_caption=False))}


def test_image_text_and_region_lines(pretrain_files, capsys):
    root = pretrain_files
    paths = images_to_shards([str(root / "it.jsonl"), str(root / "region.jsonl")], str(root / "img"),
                             str(root / "out"), "pre", per_shard=3)
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: bad_base64", "skipped 2 entries: unreadable_image", "skipped 1 entry: missing_image",
                 "skipped 1 entry: no_image", "skipped 1 entry: bad_entry", "skipped 2 entries: empty_text",
                 "skipped 3 entries: bad_box", "6 usable images"):
        assert line in printed, printed
    got = samples_of(paths)
    assert sorted(got) == ["dog", "it_000000001", "it_000000002", "it_000000003", "region_000000002", "vg1"]
    assert got["it_000000001"]["json"]["caption"] == "a blue picture"
    assert got["it_000000002"]["json"]["captions"] == ["green one", "a green square"]
    assert got["it_000000003"]["json"]["captions"] == ["dark", "暗"]
    assert got["dog"]["json"]["captions"] == ["a dog", "the same dog again"]
    assert "regions" not in got["dog"]["json"] or got["dog"]["json"]["regions"] == []  # its only box was outside
    vg = got["vg1"]["json"]
    assert "caption" not in vg  # a region line without a whole-image caption
    assert vg["regions"][0] == {"box": [10.0, 10.0, 30.0, 20.0], "phrase": "tall a tree",
                                "phrases": ["tall a tree", "green a tree"]}
    assert vg["regions"][1]["phrases"] == ["a road", "the street"] and vg["regions"][1]["box"] == [0.0, 50.0, 100.0,
                                                                                                   30.0]
    grey = got["region_000000002"]["json"]
    assert grey["caption"] == "a grey scene" and grey["regions"][0]["phrase"] == "a spot"
    # the image bytes are stored as they came (a JPEG stays the same JPEG; a PNG stays PNG)
    import tarfile

    members = {}
    for p in paths:
        with tarfile.open(p) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar if m.isfile()})
    assert members["dog.jpg"] == (root / "img" / "dog.jpg").read_bytes()
    assert members["it_000000002.png"][:4] == b"\x89PNG"
    # an image sample without a caption is refused where a caption is needed (an image source)
    assert decode_image("vg1", {"jpg": members["vg1.jpg"], "json": members["vg1.json"]})[1] == {"missing_caption": 1}


def test_training_draws_captions_and_phrases(pretrain_files):
    root = pretrain_files
    paths = images_to_shards([str(root / "region.jsonl")], str(root / "img"), str(root / "out"), per_shard=10)
    import tarfile

    with tarfile.open(paths[0]) as tar:
        files = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar if m.name.startswith("vg1.")}
    phrases = {decode_image("vg1", files, np.random.default_rng(i), needs_caption=False, train=True)[0]["json"]
               ["regions"][0]["phrase"] for i in range(40)}
    assert phrases == {"tall a tree", "green a tree"}
    assert decode_image("vg1", files, np.random.default_rng(0), needs_caption=False)[0]["json"]["regions"][0][
        "phrase"] == "tall a tree"  # evaluation: the first


def test_parallel_conversion_writes_the_same_bytes(pretrain_files):
    root = pretrain_files
    ann = [str(root / "it.jsonl"), str(root / "region.jsonl")]
    one = images_to_shards(ann, str(root / "img"), str(root / "p1"), per_shard=2, processes=1)
    two = images_to_shards(ann, str(root / "img"), str(root / "p2"), per_shard=2, processes=2)
    assert [open(a, "rb").read() for a in one] == [open(b, "rb").read() for b in two] and len(one) == 3


def frames(colour, n, size=(32, 24)):
    return [b64(jpeg(tuple(min(255, c + 10 * i) for c in colour), size)) for i in range(n)]


def test_video_text_lines(tmp_path, capsys):
    lines = [
        {"video_frames": frames((100, 0, 0), 4), "text": "a red clip"},
        {"video_frames": [frames((0, 100, 0), 2), frames((0, 0, 100), 3)], "is_continuous": True,
         "text": ["green first", "[Music]"]},
        {"video_frames": [frames((50, 50, 0), 2), frames((0, 50, 50), 2)], "is_continuous": False,
         "text": ["yellow clip", "cyan clip"]},
        {"video_frames": frames((1, 1, 1), 2) + ["@@@"], "text": "bad frame"},
        {"video_frames": frames((1, 1, 1), 1) + frames((2, 2, 2), 1, (16, 16)), "text": "sizes differ"},
        {"video_frames": frames((1, 1, 1), 2), "text": "[Music]"},
        {"video_frames": [], "text": "nothing"},
        {"text": "no frames key"},
    ]
    ann = tmp_path / "video.jsonl"
    ann.write_text("\n".join(json.dumps(e) for e in lines))
    paths = videos_to_shards([str(ann)], str(tmp_path / "out"), per_shard=10, frame_fps=2.0)
    printed = capsys.readouterr().out
    for line in ("skipped 2 entries: bad_frames", "skipped 1 entry: empty_text", "skipped 2 entries: no_frames",
                 "4 usable clips (frames at 2 per second)"):
        assert line in printed, printed
    clips = {s["key"]: s for s in iterate_samples(paths, ClipDecoder(fps=2.0, max_frames=None, needs="caption"))}
    assert sorted(clips) == ["video_000000001", "video_000000002", "video_000000003_0", "video_000000003_1"]
    one = clips["video_000000001"]
    assert one["frames"].shape == (4, 24, 32, 3) and one["timestamps"] == [0.25, 0.75, 1.25, 1.75]
    assert abs(int(one["frames"][0, 0, 0, 0]) - 100) < 8 and abs(int(one["frames"][3, 0, 0, 0]) - 130) < 8
    joined = clips["video_000000002"]
    assert joined["frames"].shape[0] == 5 and joined["json"]["caption"] == "green first"
    assert clips["video_000000003_1"]["json"]["caption"] == "cyan clip"
    with pytest.raises(ValueError, match="written at 2.0 fps"):  # the rate the shards say must be read with
        list(iterate_samples(paths, ClipDecoder(fps=1.0, needs="caption")))


def test_command_line(pretrain_files):
    root = pretrain_files
    p = subprocess.run([sys.executable, "-m", "x2vlm", "make-shards", "--format", "xvlm", "--annotations",
                        str(root / "it.jsonl"), str(root / "region.jsonl"), "--image-root", str(root / "img"),
                        "--out", str(root / "cli"), "--processes", "1"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "6 usable images" in p.stdout and "wrote 1 shard(s)" in p.stdout
    assert p.stderr == ""  # no progress bar when the output is not a terminal
