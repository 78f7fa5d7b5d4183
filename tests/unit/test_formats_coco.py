"""COCO captions (the official file, Karpathy's dataset_coco.json, ALBEF's Karpathy-split files) to image shards
with all captions of an image, broken entries included; and retrieval that ranks by instance over several
captions per image, equal to the plain ranks when each image has one caption."""
import io
import json

import pytest
import torch
from PIL import Image

from x2vlm.data.formats.coco import coco_to_shards
from x2vlm.eval.ranking import gt_ranks
from x2vlm.eval.retrieval import evaluate_retrieval, positive_ranks
from x2vlm.eval.run import load_captioned_pool, load_pool


def write_image(path, colour, size=(48, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    path.write_bytes(buf.getvalue())


@pytest.fixture()
def coco(tmp_path):
    for i, colour in ((1, (200, 0, 0)), (2, (0, 200, 0)), (3, (0, 0, 200))):
        write_image(tmp_path / "val2014" / f"COCO_val2014_{i:012d}.jpg", colour)
    (tmp_path / "val2014" / "COCO_val2014_000000000005.jpg").write_bytes(b"truncated jpeg")
    return tmp_path


def test_official_captions_file(coco, capsys):
    ann = coco / "captions_val2014.json"
    ann.write_text(json.dumps({
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "width": 48, "height": 32}
                   for i in (1, 2, 3, 4, 5)] + [{"file_name": "no id"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A red square."},
                        {"image_id": 2, "id": 11, "caption": "A green square."},
                        {"image_id": 1, "id": 12, "caption": "Something red. "},
                        {"image_id": 2, "id": 13, "caption": "  "},
                        {"image_id": 4, "id": 14, "caption": "the file is missing"},
                        {"image_id": 5, "id": 15, "caption": "the file is broken"},
                        {"image_id": 99, "id": 16, "caption": "unknown image"},
                        "not an annotation"]}))
    paths = coco_to_shards(str(ann), str(coco), str(coco / "out"), "val", per_shard=10)
    printed = capsys.readouterr().out
    for line in ("skipped 2 entries: bad_entry", "skipped 1 entry: empty_text", "skipped 1 entry: unknown_image",
                 "skipped 1 entry: no_caption", "skipped 1 entry: missing_image", "skipped 1 entry: unreadable_image",
                 "2 usable images"):
        assert line in printed, printed
    images, captions, instances, keys = load_captioned_pool(paths, 32)
    assert keys == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    assert captions == [["A red square.", "Something red."], ["A green square."]]
    assert images.shape == (2, 3, 32, 32) and instances.tolist() == [0, 1]
    assert load_pool(paths, 32)[1] == ["A red square.", "A green square."]


def test_karpathy_dataset_file_by_split(coco, capsys):
    ann = coco / "dataset_coco.json"
    sentences = lambda *raw: [{"raw": r, "tokens": r.lower().split(), "sentid": 0} for r in raw]  # noqa: E731
    ann.write_text(json.dumps({"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "cocoid": 1, "split": "test",
         "sentences": sentences("red one", "red two")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "cocoid": 2, "split": "restval",
         "sentences": sentences("green")},
        {"filepath": "val2014", "filename": "COCO_val2014_000000000003.jpg", "cocoid": 3, "split": "train",
         "sentences": []},
        {"filename": 7}]}))
    test = coco_to_shards(str(ann), str(coco), str(coco / "test"), "test", split="test")
    assert load_captioned_pool(test, 32)[1] == [["red one", "red two"]]
    train = coco_to_shards(str(ann), str(coco), str(coco / "train"), "train", split="train,restval")
    printed = capsys.readouterr().out
    assert "skipped 1 entry: no_caption" in printed and "skipped 1 entry: bad_entry" in printed
    assert load_captioned_pool(train, 32)[3] == ["val2014_COCO_val2014_000000000002"]


def test_albef_karpathy_files_merge_an_image_s_captions(coco, capsys):
    train = coco / "coco_karpathy_train.json"
    train.write_text(json.dumps([
        {"caption": "a red thing", "image": "val2014/COCO_val2014_000000000001.jpg", "image_id": "coco_1"},
        {"caption": "a green thing", "image": "val2014/COCO_val2014_000000000002.jpg", "image_id": "coco_2"},
        {"caption": "red again", "image": "val2014/COCO_val2014_000000000001.jpg", "image_id": "coco_1"},
        {"caption": "", "image": "val2014/COCO_val2014_000000000003.jpg", "image_id": "coco_3"},
        {"caption": "no image"}]))
    paths = coco_to_shards(str(train), str(coco), str(coco / "train"), "train")
    printed = capsys.readouterr().out
    assert "skipped 1 entry: empty_text" in printed and "skipped 1 entry: bad_entry" in printed, printed
    _, captions, _, keys = load_captioned_pool(paths, 32)
    assert captions == [["a red thing", "red again"], ["a green thing"]]
    val = coco / "coco_karpathy_val.json"
    val.write_text(json.dumps([{"image": "val2014/COCO_val2014_000000000003.jpg", "caption": ["blue", "a blue one"]}]))
    vpaths = coco_to_shards(str(val), str(coco), str(coco / "val"), "val")
    from x2vlm.data.pipeline import iterate_samples

    meta = next(iter(iterate_samples(vpaths)))["json"]
    assert meta["captions"] == ["blue", "a blue one"] and meta["image_id"] == 3  # parsed from the file name


def test_ranks_by_instance_over_several_captions():
    # 3 images; texts 0, 1 describe image 0, text 2 image 1, texts 3, 4 image 2
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.3, 0.6, 0.1], [0.5, 0.4, 0.45], [0.1, 0.2, 0.3]])
    text_item = torch.tensor([0, 0, 1, 2, 2])
    positive = text_item[:, None] == torch.arange(3)[None, :]
    assert positive_ranks(scores, positive).tolist() == [0, 2, 0, 1, 0]  # text -> image: the rank of its image
    # image -> text: the rank of the best-ranked of its texts
    assert positive_ranks(scores.T, positive.T).tolist() == [0, 1, 2]
    # one text per image: the plain ranks, ties in the true item's favour
    square = torch.tensor([[0.5, 0.5, 0.1], [0.3, 0.2, 0.9], [0.1, 0.7, 0.7]])
    assert torch.equal(positive_ranks(square, torch.eye(3, dtype=torch.bool)), gt_ranks(square, torch.arange(3)))


class Lookup(torch.nn.Module):
    """A stand-in model whose features are given: image i -> row i of `img`, text t -> row ids[t, 0] of `txt`."""

    def __init__(self, img, txt):
        super().__init__()
        self.img, self.txt = img, txt

    def encode_image(self, images):
        return images[:, :1, 0, :self.img.shape[1]].reshape(len(images), 1, -1)

    def image_feat(self, v):
        return v[:, 0]

    def encode_text(self, ids, atts):
        return self.txt[ids[:, 0]][:, None]

    def text_feat(self, t):
        return t[:, 0]

    def itm_logits(self, txt, atts, vis, index):
        match = (txt[:, 0] * vis[index, 0]).sum(-1)
        return torch.stack([-match, match], -1)

    def temperature(self):
        return torch.tensor(0.07)


def test_evaluation_uses_all_captions_and_agrees_with_one_caption_per_image():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(2, 0) + 0.9 * torch.randn(8, 6), dim=-1)
    images = torch.zeros(4, 3, 8, 8)
    images[:, 0, 0, :6] = img
    ids = torch.arange(8)[:, None].repeat(1, 3)
    model = Lookup(img, txt)
    many = evaluate_retrieval(model, images, ids, torch.ones_like(ids), rerank_k=2,
                              text_item=torch.arange(8) // 2)
    sim = txt @ img.T
    positive = (torch.arange(8) // 2)[:, None] == torch.arange(4)[None, :]
    t2i = positive_ranks(sim, positive)
    assert many["t2i_r1"] == pytest.approx(float((t2i < 1).float().mean()))
    assert many["i2t_r1"] == pytest.approx(float((positive_ranks(sim.T, positive.T) < 1).float().mean()))
    assert many["pool_size"] == 4 and many["n_texts"] == 8
    first = ids[::2]  # the first caption of each image: the same numbers with or without the new arguments
    plain = evaluate_retrieval(model, images, first, torch.ones_like(first), rerank_k=2)
    again = evaluate_retrieval(model, images, first, torch.ones_like(first), rerank_k=2,
                               text_item=torch.arange(4), instances=torch.arange(4))
    assert plain == again and "n_texts" not in plain
    gt = gt_ranks(txt[::2] @ img.T, torch.arange(4))
    assert plain["t2i_r1"] == float((gt < 1).float().mean())
