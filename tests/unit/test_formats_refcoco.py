"""RefCOCO / RefCOCO+ / RefCOCOg (refs(unc).p + instances.json) to region shards by split: boxes in pixels from
the annotations, broken refs counted, a pickle that would run code refused; the shards evaluate as grounding."""
import io
import json
import os
import pickle

import pytest
from PIL import Image

from x2vlm.data.formats.common import read_plain_pickle
from x2vlm.data.formats.refcoco import refcoco_to_shards
from x2vlm.data.samples import decode_image
from x2vlm.eval.run import load_grounding


def write_image(path, size=(80, 60)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 100, 200)).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


def ref(ref_id, ann_id, image_id, split, *sents):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "sent_ids": list(range(len(sents))),
            "sentences": [{"tokens": s.split(), "raw": s.capitalize(), "sent_id": 100 * ref_id + i, "sent": s}
                          for i, s in enumerate(sents)]}


@pytest.fixture()
def refcoco(tmp_path):
    data = tmp_path / "refcoco+"
    data.mkdir()
    for image_id in (1, 2):
        write_image(tmp_path / "train2014" / f"COCO_train2014_{image_id:012d}.jpg")
    refs = [ref(1, 11, 1, "train", "man on left", "left guy"), ref(2, 12, 1, "train", "woman in red"),
            ref(3, 13, 2, "testA", "player on right"), ref(4, 14, 2, "val", "blue shirt"),
            ref(5, 99, 1, "train", "no such object"), ref(6, 15, 7, "train", "no such image"),
            ref(7, 16, 1, "train", ""), ref(8, 17, 1, "train", "odd box"), "not a ref"]
    with open(data / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    instances = {"images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 80, "height": 60}
                            for i in (1, 2)],
                 "annotations": [{"id": 11, "image_id": 1, "bbox": [2.5, 5.0, 20.0, 30.0], "category_id": 1},
                                 {"id": 12, "image_id": 1, "bbox": [40.0, 10.0, 30.0, 40.0], "category_id": 1},
                                 {"id": 13, "image_id": 2, "bbox": [50.0, 0.0, 30.0, 60.0], "category_id": 1},
                                 {"id": 14, "image_id": 2, "bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 1},
                                 {"id": 15, "image_id": 7, "bbox": [0.0, 0.0, 1.0, 1.0], "category_id": 1},
                                 {"id": 16, "image_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "category_id": 1},
                                 {"id": 17, "image_id": 1, "bbox": [0.0, 0.0, 5.0], "category_id": 1}],
                 "categories": [{"id": 1, "name": "person"}]}
    (data / "instances.json").write_text(json.dumps(instances))
    return tmp_path


def test_refs_by_split(refcoco, capsys):
    train = refcoco_to_shards(str(refcoco / "refcoco+"), str(refcoco), str(refcoco / "train"), "train",
                              split="train")
    printed = capsys.readouterr().out
    for line in ("skipped 1 entry: bad_entry", "skipped 1 entry: unknown_annotation", "skipped 1 entry: unknown_image",
                 "skipped 1 entry: empty_text", "skipped 1 entry: bad_box", "1 usable images (train)"):
        assert line in printed, printed
    import tarfile

    with tarfile.open(train[0]) as tar:
        files = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar}
    sample, bad = decode_image("coco_1", files, needs_caption=False)
    assert not bad and "caption" not in sample["json"]
    regions = sample["json"]["regions"]
    assert [(r["phrase"], r["box"], r["ref_id"], r["ann_id"]) for r in regions] == [
        ("man on left", [2.5, 5.0, 20.0, 30.0], 1, 11), ("left guy", [2.5, 5.0, 20.0, 30.0], 1, 11),
        ("woman in red", [40.0, 10.0, 30.0, 40.0], 2, 12)]
    test = refcoco_to_shards(str(refcoco / "refcoco+" / "refs(unc).p"), str(refcoco), str(refcoco / "testA"),
                             "testA", split="testA,val")
    grounding = load_grounding(test, 40, min_shapes=1)  # evaluation reads them: boxes scaled to the input size
    assert [[(p, b) for p, b in regions] for _, regions in grounding] == [
        [("player on right", [25.0, 0.0, 15.0, 40.0]), ("blue shirt", [0.0, 0.0, 5.0, pytest.approx(20 / 3)])]]
    with pytest.raises(ValueError, match="no ref in split 'testB'"):
        refcoco_to_shards(str(refcoco / "refcoco+"), str(refcoco), str(refcoco / "b"), split="testB")
    with pytest.raises(ValueError, match="give the split"):
        refcoco_to_shards(str(refcoco / "refcoco+"), str(refcoco), str(refcoco / "b"))


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 1, "x": Payload(marker)}], protocol=2))
    with pytest.raises(ValueError, match=r"refs\(unc\).p: not a readable pickle of plain data \(refused: the pickle "
                                         r"names (posix|os)\.system"):
        read_plain_pickle(str(bad))
    assert not marker.exists()
    (tmp_path / "instances.json").write_text("{}")
    from x2vlm.cli import main

    assert main(["make-shards", "--format", "refcoco", "--annotations", str(bad), "--split", "train", "--out",
                 str(tmp_path / "o")]) == 1
    assert not marker.exists()


def test_python2_pickles_read():
    # protocol 2 as Python 2 writes it: byte strings (SHORT_BINSTRING) for str, a set via __builtin__.set
    data = (b"\x80\x02]q\x00}q\x01(U\x05splitq\x02U\x05trainq\x03U\x03idsq\x04c__builtin__\nset\nq\x05]q\x06"
            b"(K\x01K\x02e\x85q\x07Rq\x08ua.")
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".p") as f:
        f.write(data)
        f.flush()
        assert read_plain_pickle(f.name) == [{"split": "train", "ids": {1, 2}}]
