"""The inference API on a freshly initialised tiny export: preprocessing as evaluation's, features and similarity,
batching that changes nothing, grounding in the image's own pixels, clear errors, and `x2vlm embed` over files,
folders and shards (features, keys, skipped inputs counted)."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import x2vlm
from x2vlm.config import load_config, update
from x2vlm.data.transforms import eval_transform
from x2vlm.demo.shapesworld import generate
from x2vlm.pretrained import build_model, export_weights

TEXTS = ["a red circle", "two blue squares", "a green triangle left of a white cross", "what colour is the shape"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    from x2vlm.data.samples import write_shards
    from x2vlm.data.tokenizer import load_tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("inference")
    train_tokenizer(TEXTS * 10, str(root / "tok"), vocab_size=100)
    tok = load_tokenizer(str(root / "tok"))
    cfg = update(load_config("tiny"), {"model.text.tokenizer": str(root / "tok")})
    torch.manual_seed(0)
    export_weights(build_model(cfg, tok).state_dict(), cfg, root / "export", str(root / "tok"))
    samples = generate("heldout", 5, seed=1, image_size=64)
    (root / "images" / "sub").mkdir(parents=True)
    for i, s in enumerate(samples):
        s["image"].save(root / "images" / ("sub" if i % 2 else "") / f"img{i}.png")
    shards = write_shards(samples, str(root / "shards"), "pool", 3, image_format="png")
    return root, samples, shards


def test_features_are_the_model_s_on_evaluation_s_preprocessing(export):
    root, samples, _ = export
    m = x2vlm.load(root / "export")
    paths = sorted((root / "images").rglob("*.png"))
    feats = m.encode_images([str(p) for p in paths], batch_size=2)
    with torch.no_grad():
        pixels = torch.stack([eval_transform(Image.open(p).convert("RGB"), [], 64)[0] for p in paths])
        expected = m.model.image_feat(m.model.encode_image(pixels))
    assert feats.shape == (5, 128) and torch.allclose(feats, expected, atol=1e-6)
    assert torch.allclose(m.encode_images([s["image"] for s in samples[:2]], batch_size=1),
                          m.encode_images([np.asarray(s["image"]) for s in samples[:2]]), atol=1e-6)
    t = m.encode_texts(TEXTS, batch_size=3)
    assert torch.allclose(t.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(t, m.encode_texts(TEXTS), atol=1e-6)
    sims = m.similarity(t, feats)
    assert sims.shape == (4, 5) and torch.allclose(sims, t @ feats.T, atol=1e-6)


def test_rank_orders_by_score_and_reranks_the_top_k(export):
    root, samples, _ = export
    m = x2vlm.load(root / "export")
    images = [s["image"] for s in samples]
    r = m.rank(TEXTS, images)
    assert r["t2i"].shape == (4, 5) and torch.equal(r["i2t"], r["t2i"].T)
    assert torch.allclose(r["t2i"], m.similarity(m.encode_texts(TEXTS), m.encode_images(images)), atol=1e-5)
    assert torch.equal(r["t2i_order"][:, 0], r["t2i"].argmax(1))
    rr = m.rank(TEXTS, images, rerank=2)
    top2 = r["t2i_order"][:, :2]
    assert torch.equal(rr["t2i_order"][:, :2].sort(1).values, top2.sort(1).values)  # the same two, re-scored
    # re-scored: ITM's match log-odds plus ITC's logit (similarity over the temperature)
    from x2vlm.eval.retrieval import encode_pool, itm_scorer
    ids, atts = m.tokens(TEXTS)
    with torch.no_grad():
        vis, _, txt, _ = encode_pool(m.model, lambda i, j: m.model.encode_image(m.image_tensors(images[i:j])), 5,
                                     ids, atts)
        rows = torch.arange(4)[:, None].expand_as(top2)
        odds = itm_scorer(m.model, vis, txt, atts)(rows.reshape(-1), top2.reshape(-1)).view(4, 2)
        expected = odds + r["t2i"].gather(1, top2) / float(m.model.temperature())
    assert torch.allclose(rr["t2i"].gather(1, top2), expected, atol=1e-4)


def test_ground_gives_boxes_in_the_image_s_own_pixels(export):
    root, samples, _ = export
    m = x2vlm.load(root / "export")
    image = samples[0]["image"].resize((160, 96))  # not the model's size, not square
    box = m.ground(image, "the red circle")
    boxes = m.ground(image, ["the red circle", "a blue square"])
    assert box == pytest.approx(boxes[0]) and len(boxes) == 2
    with torch.no_grad():
        pixels = eval_transform(image, [], 64)[0][None]
        ids = m.tokenizer(["the red circle"], return_tensors="pt")
        cx, cy, w, h = m.model.predict_boxes(pixels, ids["input_ids"], ids["attention_mask"])[0].tolist()
    assert box == pytest.approx([(cx - w / 2) * 160, (cy - h / 2) * 96, w * 160, h * 96], abs=1e-3)


def test_answering_needs_an_answer_head_and_its_vocabulary(export):
    root, samples, _ = export
    m = x2vlm.load(root / "export")
    with pytest.raises(ValueError, match="not a question-answering model"):
        m.answer(samples[0]["image"], "what colour is the shape")


def test_x2vlm_load_is_imported_lazily():
    p = subprocess.run([sys.executable, "-c", "import sys, x2vlm; assert callable(x2vlm.load); "
                        "assert 'x2vlm.inference' not in sys.modules and 'x2vlm.pretrained' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def embed_cli(*args):
    return subprocess.run([sys.executable, "-m", "x2vlm", "embed", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_embed_folder_files_and_shards(export, tmp_path):
    root, samples, shards = export
    (root / "images" / "broken.jpg").write_bytes(b"not an image")
    try:
        p = embed_cli("--checkpoint", root / "export", "--images", root / "images", *shards,
                      "--out", tmp_path / "feats.npy", "--batch-size", "2")
    finally:
        (root / "images" / "broken.jpg").unlink()
    assert p.returncode == 0, p.stderr
    assert "skipped 1: bad_image" in p.stdout and "10 images -> 128-d features" in p.stdout
    feats = np.load(tmp_path / "feats.npy")
    keys = (tmp_path / "feats.keys.txt").read_text().split()
    assert feats.shape == (10, 128) and keys[:5] == ["img0.png", "img2.png", "img4.png", "sub/img1.png",
                                                     "sub/img3.png"]
    assert keys[5:] == [str(s["key"]) for s in samples]
    m = x2vlm.load(root / "export")
    assert np.allclose(feats[:5], m.encode_images([str(root / "images" / k) for k in keys[:5]]).numpy(), atol=1e-5)
    assert np.allclose(feats[5:], feats[[0, 3, 1, 4, 2]], atol=1e-5)  # the same images, read from the shards
    bad = embed_cli("--checkpoint", root / "export", "--images", root / "images", "--out", tmp_path / "f.csv")
    assert bad.returncode == 1 and "expected a .npy or .parquet file" in bad.stderr


def test_embed_parquet(export, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    root, _, _ = export
    p = embed_cli("--checkpoint", root / "export", "--images", root / "images", "--out", tmp_path / "f.parquet")
    assert p.returncode == 0, p.stderr
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.num_rows == 5 and table.column_names == ["key", "embedding"]
