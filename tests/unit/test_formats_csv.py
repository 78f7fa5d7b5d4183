"""CSV / TSV tables of (file, caption) to image or video shards: named and numbered columns, a path template,
files without an extension, WebVid's ISO durations; broken rows counted."""
import io
import json

import numpy as np
from PIL import Image

from video.encode import encode_video
from x2vlm.data.formats.tables import table_to_shards
from x2vlm.data.pipeline import iterate_samples
from x2vlm.data.samples import ClipDecoder


def write_image(path, colour=(0, 90, 180)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


def test_csv_with_header_and_tsv_without(tmp_path, capsys):
    write_image(tmp_path / "img" / "a.jpg")
    write_image(tmp_path / "img" / "sub" / "b.jpg")
    write_image(tmp_path / "img" / "c.png")
    (tmp_path / "img" / "bad.jpg").write_bytes(b"nope")
    (tmp_path / "cc.csv").write_text(
        "filepath,title,source\n"
        "a.jpg,a blue picture,web\n"
        "sub/b.jpg,\"a picture, with a comma\",web\n"
        "a.jpg,the same picture again,web\n"
        "c,no extension given,web\n"
        "bad.jpg,broken,web\n"
        "missing.jpg,gone,web\n"
        "b2.jpg,   ,web\n"
        "only-one-column\n")
    paths = table_to_shards(str(tmp_path / "cc.csv"), str(tmp_path / "img"), str(tmp_path / "out"),
                            path_column="filepath", caption_column="title")
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: bad_row", "skipped 1 entry: empty_text", "skipped 1 entry: missing_image",
                 "skipped 1 entry: unreadable_image", "3 usable images"):
        assert line in printed, printed
    got = {s["key"]: s["json"] for s in iterate_samples(paths)}
    assert got["a"]["captions"] == ["a blue picture", "the same picture again"] and got["a"]["source"] == "web"
    assert got["sub_b"]["caption"] == "a picture, with a comma" and got["c"]["caption"] == "no extension given"
    (tmp_path / "cc3m.tsv").write_text("a caption for a\ta.jpg\n\nc caption\tc.png\n")
    tsv = table_to_shards(str(tmp_path / "cc3m.tsv"), str(tmp_path / "img"), str(tmp_path / "tsv"),
                          path_column="1", caption_column="0")
    assert [s["json"]["caption"] for s in iterate_samples(tsv)] == ["a caption for a", "c caption"]


def test_webvid_style_video_table(tmp_path, capsys):
    videos = tmp_path / "videos" / "1066"
    videos.mkdir(parents=True)
    frames = np.zeros((6, 32, 32, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(6)[:, None, None] * 40
    (videos / "31353427.mp4").write_bytes(encode_video(frames, fps=2))
    (videos / "14781349.mp4").write_bytes(b"broken")
    (tmp_path / "results_2M_val.csv").write_text(
        "videoid,contentUrl,duration,page_dir,name\n"
        "31353427,https://example.invalid/a.mp4,PT00H00M03S,1066,Merida mexico tourists walking\n"
        "14781349,https://example.invalid/b.mp4,PT00H00M11S,1066,Happy family using laptop\n"
        "99999999,https://example.invalid/c.mp4,PT00H00M05S,1066,never downloaded\n")
    paths = table_to_shards(str(tmp_path / "results_2M_val.csv"), str(tmp_path / "videos"), str(tmp_path / "out"),
                            path_column="{page_dir}/{videoid}", caption_column="name", media="video")
    printed = capsys.readouterr().out
    assert "skipped 1 entry: missing_video" in printed and "skipped 1 entry: unreadable_video" in printed, printed
    clips = list(iterate_samples(paths, ClipDecoder(fps=1.0, max_frames=2, needs="caption")))
    assert [c["key"] for c in clips] == ["1066_31353427"]
    meta = clips[0]["json"]
    assert meta["caption"] == "Merida mexico tourists walking" and meta["duration"] == 3.0
    assert meta["videoid"] == "31353427" and clips[0]["frames"].shape[0] == 2
    assert json.loads(json.dumps(meta)) == meta
