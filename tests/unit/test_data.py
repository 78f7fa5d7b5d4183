"""Data package: generator, shards, transforms, tokenizer, masking, loaders."""
import io
import json
import os
import time

import x2vlm  # noqa: F401  (before torchvision / transformers)
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from x2vlm.config import DataConfig, LossConfig, SourceConfig
from x2vlm.data.masking import mask_tokens
from x2vlm.data.pipeline import build_loader, build_loaders, iterate_samples
from x2vlm.demo.shapesworld import COLOURS, HELDOUT_PAIRS, corpus, generate
from x2vlm.data.samples import decode_image, write_shards
from x2vlm.data.shards import ShardStream, expand_shards
from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer
from x2vlm.data.transforms import crop_boxes, eval_transform, train_transform

SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """48 training samples in 8 shards and a tokenizer trained on their texts."""
    root = tmp_path_factory.mktemp("world")
    samples = generate("train", 48, seed=1)
    paths = write_shards(samples, str(root / "shards"), "train", 6)
    tok = train_tokenizer(corpus(samples), str(root / "tok"))
    return {"root": root, "samples": samples, "paths": paths, "tok_dir": str(root / "tok"), "tok": tok}


def pixels(tensor):
    """Normalised [3, H, W] tensor -> uint8 [H, W, 3]."""
    return ((tensor.permute(1, 2, 0).numpy() * 0.5 + 0.5) * 255).round().clip(0, 255).astype(np.uint8)


def centre_colour(arr, box):
    x, y, w, h = box
    return arr[int(y + h / 2), int(x + w / 2)].astype(float)


# ShapesWorld

def test_generator_is_deterministic_and_prefix_stable():
    a, b = generate("train", 12, seed=7), generate("train", 12, seed=7)
    for s, t in zip(a, b):
        assert s["key"] == t["key"] and s["caption"] == t["caption"] and s["regions"] == t["regions"]
        assert np.array_equal(np.asarray(s["image"]), np.asarray(t["image"]))
    assert [s["caption"] for s in generate("train", 5, seed=7)] == [s["caption"] for s in a[:5]]
    assert [s["caption"] for s in generate("train", 12, seed=8)] != [s["caption"] for s in a]


def test_heldout_pairs_never_in_train():
    train = generate("train", 400, seed=0)
    assert not any((r["colour"], r["shape"]) in HELDOUT_PAIRS for s in train for r in s["regions"])
    assert not any(s["unseen"] for s in train)
    held = generate("heldout", 200, seed=0)
    for s in held:
        assert s["unseen"] == any((r["colour"], r["shape"]) in HELDOUT_PAIRS for r in s["regions"])
    assert 0.1 < np.mean([s["unseen"] for s in held]) < 0.6


def test_shapes_boxes_captions():
    samples = generate("train", 100, seed=3, image_size=SIZE)
    assert len({s["caption"] for s in samples}) >= 95
    for s in samples:
        arr = np.asarray(s["image"])
        assert arr.shape == (SIZE, SIZE, 3) and 1 <= s["n_shapes"] == len(s["regions"]) <= 4
        pairs = [(r["colour"], r["shape"]) for r in s["regions"]]
        assert len(set(pairs)) == len(pairs)
        for i, r in enumerate(s["regions"]):
            x, y, w, h = r["box"]
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE and 14 <= w <= 26
            assert np.array_equal(centre_colour(arr, r["box"]), COLOURS[r["colour"]])
            assert f"{r['colour']} {r['shape']}" in s["caption"] and f"{r['colour']} {r['shape']}" in r["phrase"]
            for q in s["regions"][i + 1:]:
                qx, qy, qw, qh = q["box"]
                assert x + w <= qx or qx + qw <= x or y + h <= qy or qy + qh <= y
    texts = corpus(samples)
    assert len(texts) == sum(1 + len(s["regions"]) for s in samples)


# Shards

def test_expand_shards(world, tmp_path):
    d = os.path.dirname(world["paths"][0])
    assert expand_shards([os.path.join(d, "train-*.tar")]) == world["paths"]
    assert expand_shards(os.path.join(d, "train-{000000..000001}.tar")) == world["paths"][:2]
    assert expand_shards([d]) == world["paths"]
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        expand_shards([os.path.join(d, "train-*.tar"), str(tmp_path / "nothing-*.tar")])


def keys_of(stream, workers):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [s["key"] for s in loader if "key" in s]


def test_round_trip_workers_and_ranks(world):
    written = [s["key"] for s in world["samples"]]
    keys = keys_of(ShardStream(world["paths"], decode_image, seed=3, infinite=False, num_workers=2), workers=2)
    assert sorted(keys) == sorted(written)
    per_rank = [keys_of(ShardStream(world["paths"], decode_image, seed=3, infinite=False, rank=r, world_size=2,
                                    num_workers=2), workers=2) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(written)
    sample = next(iter(iterate_samples(world["paths"])))
    src = world["samples"][0]
    assert sample["key"] == src["key"] and sample["json"]["caption"] == src["caption"]
    assert sample["json"]["regions"] == src["regions"] and sample["image"].size == (SIZE, SIZE)


def test_infinite_stream_epochs_and_shuffle(world):
    stream = ShardStream(world["paths"], decode_image, seed=0, infinite=True, rank=0, world_size=1)
    it = iter(stream)
    first, second = [next(it)["key"] for _ in range(48)], [next(it)["key"] for _ in range(48)]
    assert sorted(first) == sorted(second) == sorted(s["key"] for s in world["samples"])
    assert first != second


def test_too_few_shards_are_shared_sample_by_sample(world):
    """3 shards for 2 ranks x 2 workers: every worker reads every shard and keeps every 4th sample; together they
    read each sample once."""
    keys = [keys_of(ShardStream(world["paths"][:3], decode_image, seed=2, infinite=False, rank=r, world_size=2,
                                num_workers=2), workers=2) for r in range(2)]
    written = [s["key"] for s in world["samples"][:18]]
    assert sorted(keys[0] + keys[1]) == sorted(written) and abs(len(keys[0]) - len(keys[1])) <= 2


def jpeg(colour=(200, 30, 30), size=SIZE):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_counted(tmp_path, world):
    path = str(tmp_path / "bad-000000.tar")
    good = {"caption": "a red square", "regions": [{"box": [4, 4, 20, 20], "phrase": "the red square"}]}
    rows = [
        ("good1", jpeg(), good),
        ("garbage", b"not an image at all", good),
        ("nocap", jpeg(), {"regions": []}),
        ("empty", jpeg(), {"caption": "   "}),
        ("wrongtype", jpeg(), {"caption": "x", "regions": [{"box": "12", "phrase": "p"}]}),
        ("utf8", jpeg(), b'{"caption": "caf\xe9"}'),
        ("boxes", jpeg(), {"caption": "a red square", "regions": [
            {"box": [4, 4, 0, 10], "phrase": "flat"}, {"box": [100, 100, 5, 5], "phrase": "outside"},
            {"box": [50, 50, 30, 30], "phrase": "clipped"}]}),
        ("good2", jpeg(), good),
    ]
    with wds.TarWriter(path, encoder=False) as w:
        for key, img, meta in rows:
            raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
            w.write({"__key__": key, "jpg": img, "json": raw})
    junk = tmp_path / "bad-000001.tar"
    junk.write_bytes(b"not a tar file" * 50)
    counts = {}
    with pytest.warns(UserWarning, match="skipped"):
        got = {s["key"]: s for s in iterate_samples([path, str(junk)], skipped=counts)}
    assert sorted(got) == ["boxes", "good1", "good2"]
    assert counts == {"bad_image": 1, "missing_caption": 1, "empty_text": 1, "bad_json": 1, "bad_utf8": 1,
                      "bad_box": 2, "bad_shard": 1}
    assert got["boxes"]["json"]["regions"] == [{"box": [50.0, 50.0, 14.0, 14.0], "phrase": "clipped"}]
    src = SourceConfig(name="bad", kind="region", shards=[path, str(junk)], batch_size=2)
    loader = build_loader(src, DataConfig(num_workers=0), world["tok"], SIZE, 16, LossConfig(), seed=0, train=False)
    batches = list(loader)
    assert sum(len(b["keys"]) for b in batches) == 3
    total = {}
    for b in batches:
        for k, n in b["skipped"].items():
            total[k] = total.get(k, 0) + n
    assert total == counts


# Transforms

def square_image(box=(8, 20, 16, 16)):
    img = Image.new("RGB", (SIZE, SIZE), (60, 60, 60))
    x, y, w, h = box
    img.paste((220, 30, 30), (x, y, x + w, y + h))
    return img, [list(map(float, box))]


def test_train_transform_keeps_box_on_its_colour():
    img, boxes = square_image()
    flips = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        tensor, out, kept = train_transform(img, boxes, ["a red square"], 48, rng, scale_min=0.3, anchor=0)
        assert tensor.shape == (3, 48, 48) and tensor.dtype == torch.float32 and kept == [0]
        x, y, w, h = out[0]
        assert 0 <= x and 0 <= y and x + w <= 48 + 1e-4 and y + h <= 48 + 1e-4
        arr = pixels(tensor)
        inner = arr[int(np.ceil(y)) + 1:int(y + h) - 1, int(np.ceil(x)) + 1:int(x + w) - 1].reshape(-1, 3)
        assert inner.size and np.abs(inner.mean(0) - [220, 30, 30]).max() < 20
        flips += x + w / 2 > 24
    assert 5 < flips < 35  # the square starts on the left half; flips move it right


def test_flip_skipped_for_sided_texts():
    img, boxes = square_image()
    for texts, can_flip in ((["the square on the left"], False), (["a square", "RIGHT of it"], False),
                            (["a bright square"], True)):
        xs = {round(train_transform(img, boxes, texts, SIZE, np.random.default_rng(s), scale_min=1.0,
                                    anchor=0)[1][0][0]) for s in range(20)}
        assert xs == ({8, 40} if can_flip else {8})


def test_crop_boxes_and_eval_transform():
    out, kept = crop_boxes([[0, 0, 10, 10], [5, 0, 10, 10], [30, 30, 4, 4]], (4, 0, 20, 20))
    assert kept == [0, 1] and out == [[0, 0, 6, 10], [1, 0, 10, 10]]  # box 0: 60% inside
    assert crop_boxes([[0, 0, 10, 10]], (5, 0, 20, 20))[1] == []  # exactly half: dropped
    img, boxes = square_image()
    tensor, out = eval_transform(img, boxes, 32)
    assert tensor.shape == (3, 32, 32) and out == [[4.0, 10.0, 8.0, 8.0]]


# Tokenizer

def test_tokenizer_round_trip_and_offline_errors(world, monkeypatch):
    tok = load_tokenizer(world["tok_dir"])
    text = "a red circle left of a blue square"
    assert tok(text)["input_ids"] == world["tok"](text)["input_ids"]
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"])[0] == "[CLS]" and tok.pad_token_id == 0
    assert tok.mask_token == "[MASK]" and tok.is_fast
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(world["root"] / "missing-tok"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(OSError, match="unreachable"):
        load_tokenizer("some-org/some-tokenizer")
    assert time.time() - t0 < 10


# Masking

def synthetic_texts(n, seed=0, vocab=50):
    """ids [n, 24] with [CLS]=2 ... [SEP]=3 [PAD]=0 and words of 1-3 pieces; word ids alike."""
    rng = np.random.default_rng(seed)
    ids = torch.zeros(n, 24, dtype=torch.long)
    atts = torch.zeros(n, 24, dtype=torch.long)
    word_ids = []
    for m in range(n):
        length = int(rng.integers(3, 21))
        wid, w = [None], 0
        while len(wid) < length + 1:
            wid += [w] * min(int(rng.integers(1, 4)), length + 1 - len(wid))
            w += 1
        wid += [None]
        ids[m, :len(wid)] = torch.tensor([2] + rng.integers(5, vocab, len(wid) - 2).tolist() + [3])
        atts[m, :len(wid)] = 1
        word_ids.append(wid + [None] * (24 - len(wid)))
    return ids, atts, word_ids


def run_mask(ids, atts, word_ids, seed, **kw):
    kw = {"mlm_prob": 0.5, "max_masks": 6, "span_prob": 0.2, **kw}
    return mask_tokens(ids, atts, word_ids, mask_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=50,
                       generator=torch.Generator().manual_seed(seed), **kw)


def test_masking_properties():
    ids, atts, word_ids = synthetic_texts(400)
    masked, labels = run_mask(ids, atts, word_ids, seed=0)
    chosen = labels != -100
    assert (chosen.sum(1) >= 1).all() and (chosen.sum(1) <= 6).all()
    assert (labels[chosen] == ids[chosen]).all() and (masked[~chosen] == ids[~chosen]).all()
    special = torch.isin(ids, torch.tensor([0, 2, 3])) | (atts == 0)
    assert not (chosen & special).any()
    for m in range(len(ids)):
        n_real = int(atts[m].sum()) - 2
        assert chosen[m].sum() <= max(min(6, max(1, round(n_real * 0.5))), 3)  # one word may exceed a budget < 3
        for w in set(word_ids[m]) - {None}:
            pos = [i for i, v in enumerate(word_ids[m]) if v == w]
            assert len({bool(chosen[m, i]) for i in pos}) == 1, "a word is masked whole or not at all"
    again = run_mask(ids, atts, word_ids, seed=0)
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    assert not torch.equal(run_mask(ids, atts, word_ids, seed=1)[1], labels)


def test_masking_80_10_10_and_spans():
    ids, atts, word_ids = synthetic_texts(3000, seed=1)
    masked, labels = run_mask(ids, atts, word_ids, seed=2)
    chosen = labels != -100
    new, old = masked[chosen], ids[chosen]
    n = len(new)
    as_mask = (new == 4).float().mean()
    randomised = ((new != 4) & (new != old)).float().mean()
    kept = (new == old).float().mean()
    assert abs(as_mask - 0.8) < 0.015 and abs(randomised - 0.1) < 0.015 and abs(kept - 0.1) < 0.015, n
    assert not torch.isin(new[new != 4], torch.tensor([0, 1, 2, 3])).any()

    ones = [[None] + list(range(20)) + [None, None, None]] * 300  # one token per word
    ids1, atts1 = ids[:300].clone(), torch.zeros(300, 24, dtype=torch.long)
    ids1[:, 1:21] = 7
    ids1[:, 21] = 3
    atts1[:, :22] = 1

    def mean_run(span_prob):
        lab = run_mask(ids1, atts1, ones, seed=3, span_prob=span_prob, max_masks=12)[1] != -100
        assert (lab.sum(1) == 10).all()  # round(20 * 0.5), single-token words fill the budget exactly
        runs = [len(r) for row in lab.tolist() for r in "".join("1" if v else "0" for v in row).split("0") if r]
        return np.mean(runs)
    assert mean_run(1.0) > mean_run(0.0) + 0.3


# Loaders

def check_batch(batch, kind, n_images, max_len, max_texts=5, tok=None):
    images, ids = batch["images"], batch["text_ids"]
    m = ids.shape[0]
    assert images.shape == (n_images, 3, SIZE, SIZE) and images.dtype == torch.float32
    for k in ("text_ids", "text_atts", "mlm_ids", "mlm_labels"):
        assert batch[k].dtype == torch.long and batch[k].shape == ids.shape
    assert ids.shape[1] <= max_len and batch["text_atts"].sum(1).max() == ids.shape[1]
    assert batch["image_idx"].dtype == torch.long and batch["image_idx"].shape == (m,)
    assert batch["boxes"].dtype == torch.float32 and batch["boxes"].shape == (m, 4)
    assert batch["is_region"].dtype == torch.bool and batch["is_region"].shape == (m,)
    assert isinstance(batch["skipped"], dict) and len(batch["keys"]) == n_images
    idx = batch["image_idx"].tolist()
    assert idx == sorted(idx) and set(idx) == set(range(n_images))
    firsts = [idx.index(i) for i in range(n_images)]
    assert not batch["is_region"][firsts].any()
    assert torch.equal(batch["boxes"][firsts], torch.tensor([[0.0, 0, SIZE, SIZE]]).expand(n_images, 4))
    assert (batch["mlm_labels"][batch["text_atts"] == 0] == -100).all()
    changed = batch["mlm_ids"] != ids
    assert not (changed & (batch["mlm_labels"] == -100)).any()
    if kind == "image":
        assert m == n_images and idx == list(range(n_images)) and not batch["is_region"].any()
    else:
        assert max(idx.count(i) for i in range(n_images)) <= max_texts and batch["is_region"].any()
        arr = [pixels(im) for im in images]
        for j in torch.nonzero(batch["is_region"]).flatten().tolist():
            x, y, w, h = batch["boxes"][j].tolist()
            assert 0 <= x and 0 <= y and x + w <= SIZE + 1e-3 and y + h <= SIZE + 1e-3 and w > 0 and h > 0
            words = tok.decode(ids[j], skip_special_tokens=True).split()
            colour = next(c for c in COLOURS if c in words)
            assert np.abs(centre_colour(arr[batch["image_idx"][j]], (x, y, w, h)) - COLOURS[colour]).max() < 70


def test_batches_of_both_kinds(world):
    tok = world["tok"]
    cfg = DataConfig(num_workers=2, crop_scale_min=0.2, sources=[
        SourceConfig(name="images", kind="image", shards=world["paths"], batch_size=6),
        SourceConfig(name="regions", kind="region", shards=world["paths"], batch_size=4, max_texts=3)])
    loaders = build_loaders(cfg, tok, image_size=SIZE, max_len=24, loss_cfg=LossConfig(), seed=0)
    assert set(loaders) == {"images", "regions"}
    it = iter(loaders["images"])
    for _ in range(10):  # more than one epoch: the training loader never ends
        check_batch(next(it), "image", 6, 24)
    it = iter(loaders["regions"])
    for _ in range(6):
        check_batch(next(it), "region", 4, 24, max_texts=3, tok=tok)

    one_pass = build_loader(cfg.sources[1], DataConfig(num_workers=0), tok, SIZE, 24, LossConfig(), seed=0,
                            train=False)
    batches = list(one_pass)
    assert sorted(k for b in batches for k in b["keys"]) == sorted(s["key"] for s in world["samples"])
    for b in batches:
        check_batch(b, "region", len(b["keys"]), 24, tok=tok)


def test_region_source_without_captions_gives_phrases_only(world):
    tok = world["tok"]
    source = SourceConfig(name="regions", kind="region", shards=world["paths"], batch_size=5, max_texts=2,
                          with_caption=False)
    batch = next(iter(build_loader(source, DataConfig(num_workers=0), tok, SIZE, 24, LossConfig(), seed=0,
                                   train=False)))
    by_key = {s["key"]: s for s in world["samples"]}
    texts = tok.batch_decode(batch["text_ids"], skip_special_tokens=True)
    for n, key in enumerate(batch["keys"]):
        rows = (batch["image_idx"] == n).nonzero().flatten().tolist()
        regions = by_key[key].get("regions") or []
        if regions:  # up to max_texts phrases, each a region with its box
            assert len(rows) == min(2, len(regions)) and batch["is_region"][rows].all()
            assert [texts[r] for r in rows] == [tok.decode(tok(r["phrase"])["input_ids"], skip_special_tokens=True)
                                                for r in regions[:2]]
        else:  # an image without regions still gives its caption
            assert len(rows) == 1 and not batch["is_region"][rows[0]]


def test_loader_resumes_mid_epoch_with_two_workers(world):
    """Batches taken from a 2-worker loader, then a new loader resumed from the positions of the batches taken
    (an odd number: the other worker goes first): the very same batches follow, keys and tensors alike."""
    src = SourceConfig(name="regions", kind="region", shards=world["paths"], batch_size=5, max_texts=3)
    cfg = DataConfig(num_workers=2, crop_scale_min=0.3)

    def loader():
        return build_loader(src, cfg, world["tok"], SIZE, 24, LossConfig(), seed=4)

    it = iter(loader())
    whole = [next(it) for _ in range(17)]  # 85 samples: past the first epoch of each worker (24 samples)
    taken, positions = 7, {}
    for b in whole[:taken]:
        positions[str(b["_position"]["worker"])] = b["_position"]
    resumed = loader()
    resumed.dataset.resume_at(positions, taken, num_workers=2)
    it = iter(resumed)
    for want in whole[taken:]:
        got = next(it)
        assert got["keys"] == want["keys"] and got["_position"] == want["_position"]
        for k in ("images", "text_ids", "mlm_ids", "mlm_labels", "boxes"):
            assert torch.equal(got[k], want[k]), k
    assert whole[taken]["_position"]["worker"] == 1
