"""Visual Genome region descriptions (+ image_data.json) to region shards: images with regions and no caption,
boxes scaled to the file's size, broken entries counted; the shards feed region batches."""
import io
import json

import pytest
from PIL import Image

from x2vlm.config import DataConfig, LossConfig, SourceConfig
from x2vlm.data.formats.vg import vg_to_shards
from x2vlm.data.pipeline import build_loader, iterate_samples
from x2vlm.data.samples import ImageDecoder
from x2vlm.data.tokenizer import train_tokenizer


def write_image(path, size, colour=(90, 120, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


def reg(i, image_id, x, y, w, h, phrase):
    return {"region_id": i, "image_id": image_id, "x": x, "y": y, "width": w, "height": h, "phrase": phrase}


def test_region_descriptions(tmp_path, capsys):
    write_image(tmp_path / "VG_100K" / "1.jpg", (100, 50))  # image_data says 200 x 100: boxes are halved
    write_image(tmp_path / "VG_100K_2" / "2.jpg", (64, 64))
    write_image(tmp_path / "VG_100K" / "4.jpg", (64, 64))
    (tmp_path / "VG_100K" / "5.jpg").write_bytes(b"not a jpeg")
    descriptions = [
        {"id": 1, "regions": [reg(1, 1, 20, 10, 40, 20, "a man riding a horse"),
                              reg(2, 1, 100, 50, 100, 50, "green grass"),
                              reg(3, 1, 0, 0, 10, 10, "   "),
                              reg(4, 1, "x", 0, 10, 10, "bad number"),
                              reg(5, 1, 500, 500, 10, 10, "outside the image")]},
        {"id": 2, "regions": [reg(6, 2, 0, 0, 32, 32, "a red ball")]},
        {"id": 3, "regions": [reg(7, 3, 0, 0, 5, 5, "no file")]},
        {"id": 4, "regions": [reg(8, 4, 1, 1, 0, 5, "no area")]},
        {"id": 5, "regions": [reg(9, 5, 1, 1, 5, 5, "broken file")]},
        {"id": 6, "regions": [reg(10, 6, 1, 1, 5, 5, "")]},
        {"regions": []},
        "garbage",
    ]
    image_data = [{"image_id": 1, "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg", "width": 200,
                   "height": 100, "coco_id": None, "flickr_id": None},
                  {"image_id": 2, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/2.jpg", "width": 64,
                   "height": 64},
                  {"width": 3}]
    (tmp_path / "region_descriptions.json").write_text(json.dumps(descriptions))
    (tmp_path / "image_data.json").write_text(json.dumps(image_data))
    paths = vg_to_shards(str(tmp_path / "region_descriptions.json"), str(tmp_path), str(tmp_path / "out"), "vg",
                         per_shard=2, image_data=str(tmp_path / "image_data.json"))
    printed = capsys.readouterr().out
    for line in ("skipped 2 entries: bad_entry", "skipped 3 entries: bad_box", "skipped 2 entries: empty_text",
                 "skipped 1 entry: missing_image", "skipped 1 entry: unreadable_image", "skipped 2 entries: no_text",
                 "skipped 1 entry: bad_image_data", "2 usable images with regions"):
        assert line in printed, printed
    got = {s["key"]: s["json"] for s in iterate_samples(paths, ImageDecoder(needs_caption=False))}
    assert sorted(got) == ["vg_1", "vg_2"] and "caption" not in got["vg_1"]
    assert [r["box"] for r in got["vg_1"]["regions"]] == [[10.0, 5.0, 20.0, 10.0], [50.0, 25.0, 50.0, 25.0]]
    assert got["vg_2"]["regions"] == [{"box": [0.0, 0.0, 32.0, 32.0], "phrase": "a red ball"}]
    # without image_data: the files are found in the usual folders, boxes taken as they are
    plain = vg_to_shards(str(tmp_path / "region_descriptions.json"), str(tmp_path), str(tmp_path / "plain"))
    got = {s["key"]: s["json"] for s in iterate_samples(plain, ImageDecoder(needs_caption=False))}
    assert got["vg_1"]["regions"][0]["box"] == [20.0, 10.0, 40.0, 20.0] and len(got["vg_1"]["regions"]) == 1
    # region batches: every text of a VG image is a region phrase with its box (whatever with_caption says)
    tok = train_tokenizer(["a man riding a horse", "green grass", "a red ball"], str(tmp_path / "tok"))
    for with_caption in (True, False):
        src = SourceConfig(name="vg", kind="region", shards=paths, batch_size=2, max_texts=3,
                           with_caption=with_caption)
        batch = next(iter(build_loader(src, DataConfig(num_workers=0), tok, 32, 12, LossConfig(), seed=0)))
        assert sorted(batch["keys"]) == ["vg_1", "vg_2"] and batch["is_region"].all() and len(batch["is_region"]) == 3
    image_source = SourceConfig(name="vg", kind="image", shards=paths, batch_size=2)
    loader = build_loader(image_source, DataConfig(num_workers=0), tok, 32, 12, LossConfig(), seed=0, train=False)
    with pytest.warns(UserWarning, match="'missing_caption': 2"):
        assert list(loader) == []  # an image source needs captions: none here, both counted
