"""Resolution and frame count: the relative position table resampling (checked by hand and against cubic
polynomials, which its spline reproduces exactly), frame embeddings, and loading weights into a model of another
resolution or frame count (224 -> 384 px, 4 -> 8 frames) with the one line that says so; and exports that stand
alone (moved, their backbone files gone) carrying tokenizer and answer vocabulary."""
import json
import logging
import shutil

import pytest
import torch

import x2vlm  # noqa: F401
from x2vlm.config import ConfigError, load_config, update
from x2vlm.model.resize import geometric_offsets, resize_frames, resize_rel_pos_table, spline_matrix
from x2vlm.pretrained import build_model, export_weights, load_pretrained, load_weights, read_answers

TEXTS = ["a red circle left of a blue square", "two green triangles", "what colour is the shape", "blue", "red"]


def test_spline_is_the_identity_at_its_knots_and_reproduces_cubics():
    x = geometric_offsets(13, 23)
    assert torch.allclose(spline_matrix(x, x), torch.eye(len(x), dtype=torch.float64), atol=1e-12)
    xq = torch.arange(-23, 24, dtype=torch.float64)
    cubic = lambda t: 0.3 * t ** 3 - 2 * t ** 2 + t - 5  # noqa: E731
    assert torch.allclose(spline_matrix(x, xq) @ cubic(x), cubic(xq), atol=1e-8)
    quartic = lambda t: t ** 4 / 1e4  # noqa: E731  (not reproduced exactly, but closely)
    err = (spline_matrix(x, xq) @ quartic(x) - quartic(xq)).abs().max()
    assert 1e-9 < err < 1e-2 * quartic(xq).abs().max()


def test_geometric_placement_by_hand():
    # 2 offsets each way onto 3: 1 + q = 3, q = 2: offsets 1 and 2 land on 1 and 3
    assert geometric_offsets(2, 3).tolist() == pytest.approx([-3, -1, 0, 1, 3])
    assert geometric_offsets(3, 3).tolist() == [-3, -2, -1, 0, 1, 2, 3]  # the same size: where they are
    # 3 onto 2: 1 + q + q^2 = 2, q = (sqrt(5) - 1) / 2: offsets 1, 2, 3 land on 1, 1 + q, 2
    q = (5 ** 0.5 - 1) / 2
    assert geometric_offsets(3, 2).tolist() == pytest.approx([-2, -1 - q, -1, 0, 1, 1 + q, 2])


def test_relative_position_table_resized_as_a_smooth_function():
    """A table whose offset grid holds a bicubic polynomial of the placed offsets comes out holding that
    polynomial at the new integer offsets; the [CLS] rows stay; the same size is the identity."""
    src, dst = 27, 47  # 224 px -> 384 px with 16 px patches
    pos = geometric_offsets(src // 2, dst // 2)
    g = lambda y, x, h: (h + 1) * (0.01 * y ** 3 - 0.2 * x * y + 0.5 * x - 3.0) + 0.1 * h * x ** 2 * y  # noqa: E731
    heads = 3
    grid = torch.stack([g(pos[:, None], pos[None, :], h) for h in range(heads)], -1)  # [src, src, H]
    extra = torch.randn(3, heads, dtype=torch.float64)
    table = torch.cat([grid.reshape(src * src, heads), extra])
    out = resize_rel_pos_table(table, dst * dst + 3)
    new = torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64)
    expected = torch.stack([g(new[:, None], new[None, :], h) for h in range(heads)], -1).reshape(dst * dst, heads)
    assert out.shape == (2212, heads) and torch.equal(out[-3:], extra)
    assert torch.allclose(out[:-3], expected, atol=1e-6)
    assert torch.equal(resize_rel_pos_table(table, table.shape[0]), table)
    with pytest.raises(ValueError, match="rows"):
        resize_rel_pos_table(table, 100)


def test_the_spline_agrees_with_scipy_where_scipy_is_installed():
    interpolate = pytest.importorskip("scipy.interpolate")
    g = torch.Generator().manual_seed(0)
    x = geometric_offsets(13, 23)
    z = torch.randn(27, 27, generator=g, dtype=torch.float64)
    xq = torch.arange(-23, 24, dtype=torch.float64)
    ref = interpolate.RectBivariateSpline(x.numpy(), x.numpy(), z.numpy(), kx=3, ky=3, s=0)(xq.numpy(), xq.numpy())
    w = spline_matrix(x, xq)
    assert torch.allclose(w @ z @ w.T, torch.from_numpy(ref), atol=1e-9)


def test_frame_embedding_sliced_or_padded_keeping_the_mean():
    e = torch.randn(1, 4, 1, 8)
    assert torch.equal(resize_frames(e, 2), e[:, :2])
    longer = resize_frames(e, 8)
    assert torch.equal(longer[:, :4], e) and torch.allclose(longer.mean(1), e.mean(1), atol=1e-6)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from x2vlm.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXTS * 20, str(out), vocab_size=120)
    return out


def small_bert_style(*extra):
    """The x2vlm-base layout shrunk to 64 wide and 2 blocks / layers, at 224 px with 16 px patches."""
    return load_config("x2vlm-base", [
        "model.vision.width=64", "model.vision.depth=2", "model.vision.heads=2", "model.text.hidden_size=64",
        "model.text.layers=2", "model.text.heads=2", "model.text.intermediate_size=128", "model.fusion.layers=2",
        "model.fusion.heads=2", "model.fusion.intermediate_size=128", "model.embed_dim=32",
        "model.video.max_frames=4", *extra])


def test_weights_load_at_384_px_and_8_frames_with_one_line_saying_so(tmp_path, tokenizer_dir, caplog):
    from x2vlm.data.tokenizer import load_tokenizer

    cfg = small_bert_style()
    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    export_weights(model.state_dict(), cfg, tmp_path / "ckpt", str(tokenizer_dir))
    # fine-tuning at another size: the trainer builds the model from its configuration and loads the weights
    big = build_model(update(cfg, {"model.vision.image_size": 384, "model.video.max_frames": 8}), tok)
    with caplog.at_level(logging.INFO, logger="x2vlm"):
        notes = load_weights(big, tmp_path / "ckpt")
    assert sorted(notes) == ["2 relative position bias tables 27x27 -> 47x47 offsets",
                             "frame embedding 4 -> 8 frames"]
    assert sum("resized the weights" in r.getMessage() and "\n" not in r.getMessage() for r in caplog.records) == 1
    key = "vision.vit.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(big.state_dict()[key], resize_rel_pos_table(model.state_dict()[key], 2212))
    assert torch.equal(big.temporal.frame_embed[:, :4], model.temporal.frame_embed)
    assert torch.equal(big.text_proj.proj.weight, model.text_proj.proj.weight)
    # evaluation / inference at another size
    loaded, _, lcfg = load_pretrained(tmp_path / "ckpt", image_size=384, frames=8)
    assert (lcfg.model.vision.image_size, lcfg.model.video.max_frames) == (384, 8)
    with torch.no_grad():
        vis = loaded.encode_video(torch.randn(1, 8, 3, 384, 384))
    assert vis.shape == (1, 1 + 24 * 24, 64)
    with pytest.raises(ConfigError, match="image_size"):
        load_pretrained(tmp_path / "ckpt", image_size=390)


def test_own_vit_model_loads_at_another_resolution(tmp_path, tokenizer_dir):
    """The project's own layout (ViT with an absolute position table, fusion vision positions) from 64 to 96 px:
    both grids resized bicubically, the prefix rows kept."""
    from x2vlm.data.tokenizer import load_tokenizer

    cfg = load_config("tiny")
    tok = load_tokenizer(str(tokenizer_dir))
    torch.manual_seed(0)
    model = build_model(cfg, tok)
    export_weights(model.state_dict(), cfg, tmp_path / "ckpt", str(tokenizer_dir))
    big = build_model(update(cfg, {"model.vision.image_size": 96}), tok)
    notes = load_weights(big, tmp_path / "ckpt")
    assert sorted(notes) == ["fusion.vis_pos 8x8 -> 12x12 patches", "vision.vit.pos_embed 8x8 -> 12x12 patches"]
    assert torch.equal(big.vision.vit.pos_embed[:, :1], model.vision.vit.pos_embed[:, :1])
    assert torch.equal(big.fusion.vis_pos[:, :1], model.fusion.vis_pos[:, :1])
    assert big.vision.vit.pos_embed.shape == (1, 1 + 144, 128)


def test_an_export_loads_after_it_moved_and_its_backbone_files_are_gone(tmp_path, tokenizer_dir):
    """A model whose backbones came from local files (timm weights, a transformers folder) and a video QA head
    with its answer vocabulary: the export is moved, the files it came from deleted, and it still loads, with
    the same outputs, its tokenizer and its answers."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    from x2vlm.data.tokenizer import load_tokenizer

    init = tmp_path / "init"
    shutil.copytree(tokenizer_dir, init / "tok")
    tok = load_tokenizer(str(init / "tok"))
    torch.manual_seed(1)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=8, embed_dim=128,
                            depth=4, num_heads=4, num_classes=0, global_pool="")
    save_file(vit.state_dict(), str(init / "vit.safetensors"))
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=64, type_vocab_size=1),
              add_pooling_layer=False).save_pretrained(init / "bert")
    vocab = {"red": 0, "blue": 1, "two": 2}
    (init / "ans2label.json").write_text(json.dumps(vocab))
    cfg = load_config("tiny", [f"model.vision.init_checkpoint={init / 'vit.safetensors'}", "model.vision.stem=patch",
                               f"model.text.init_checkpoint={init / 'bert'}", f"model.text.tokenizer={init / 'tok'}",
                               "model.qa_answers=3", f"model.qa_vocab={init / 'ans2label.json'}"])
    model = build_model(cfg, tok).eval()
    assert len(model.text.encoder.encoder.layer) == 3  # the folder's architecture, not the preset's 2 layers
    export_weights(model.state_dict(), cfg, tmp_path / "a" / "export", str(init / "tok"))
    shutil.move(tmp_path / "a" / "export", tmp_path / "b")
    shutil.rmtree(init)  # backbone weights, tokenizer and vocabulary gone
    saved = (tmp_path / "b" / "config.yaml").read_text()
    assert "vit.safetensors" not in saved and "init/bert" not in saved and "ans2label" not in saved
    loaded, ltok, lcfg = load_pretrained(tmp_path / "b")
    assert lcfg.model.text.layers == 3 and lcfg.model.text.extra["type_vocab_size"] == 1
    assert read_answers(tmp_path / "b") == ["red", "blue", "two"]
    assert ltok("two red")["input_ids"] == tok("two red")["input_ids"]
    g = torch.Generator().manual_seed(2)
    images = torch.randn(2, 3, 64, 64, generator=g)
    enc = tok(["a red circle", "two blue"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        a, b = (m.answer_logits(m.encode_image(images), enc["input_ids"], enc["attention_mask"],
                                torch.tensor([0, 1])) for m in (model, loaded))
    assert torch.equal(a, b)


def test_a_wrong_answer_vocabulary_is_refused(tmp_path):
    from x2vlm.config import check_paths

    (tmp_path / "v.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(ConfigError, match="holds 2 answers, but model.qa_answers is 3"):
        check_paths(load_config("tiny", ["model.qa_answers=3", f"model.qa_vocab={tmp_path / 'v.json'}"]))
    (tmp_path / "w.json").write_text(json.dumps({"a": 0, "b": 2}))
    with pytest.raises(ConfigError, match="labels 0..n-1"):
        check_paths(load_config("tiny", ["model.qa_answers=2", f"model.qa_vocab={tmp_path / 'w.json'}"]))
