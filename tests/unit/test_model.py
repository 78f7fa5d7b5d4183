"""Regions, encoders, the model's forward pass, activation checkpointing, and that it learns."""
import dataclasses

import pytest
import torch

import x2vlm  # noqa: F401  (installs the torchvision shim before timm / transformers load)
from x2vlm.boxes import xywh_to_cxcywh
from x2vlm.config import load_config
from x2vlm.model import X2VLM
from x2vlm.model.regions import patch_mask
from x2vlm.model.text import TextEncoder
from x2vlm.model.vision import VisionEncoder
from x2vlm.objectives import Pretraining
from x2vlm.ops import box_pool, grid_boxes

VOCAB = 50
SIZE = 64


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread is as fast, and does not slow down a hundredfold when other
    processes keep the cores busy (threads of a parallel region waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_cfg(*extra):
    """vit_tiny at 64 px with 8 px patches, 64 wide, 2 layers; BERT 2 layers, 64 wide; fusion 2 layers."""
    return load_config("tiny", ["model.vision.width=64", "model.vision.depth=2", "model.vision.heads=2",
                                "model.text.hidden_size=64", "model.text.layers=2", "model.text.heads=2",
                                "model.text.intermediate_size=128", "model.fusion.heads=2",
                                "model.fusion.intermediate_size=128", "model.embed_dim=32", *extra])


def tiny_model(*extra, pad_id=0):
    cfg = tiny_cfg(*extra)
    return X2VLM(cfg.model, vocab_size=VOCAB, pad_id=pad_id)


PRETRAINING = Pretraining(tiny_cfg().loss)


def random_batch(g, texts_per_image=(1, 3, 2), length=7, regions=True):
    """A batch in the data package's format: per image a whole-image caption first, then region texts."""
    n_images = len(texts_per_image)
    image_idx = torch.cat([torch.full((k,), i) for i, k in enumerate(texts_per_image)])
    m = len(image_idx)
    ids = torch.randint(5, VOCAB, (m, length), generator=g)
    ids[:, 0] = 2  # [CLS]
    atts = torch.ones(m, length, dtype=torch.long)
    atts[0, 5:] = 0
    ids[0, 5:] = 0
    mlm_ids, mlm_labels = ids.clone(), torch.full((m, length), -100)
    mlm_labels[:, 2], mlm_ids[:, 2] = ids[:, 2], 4  # [MASK]
    boxes = torch.tensor([[0.0, 0.0, SIZE, SIZE]]).repeat(m, 1)
    is_region = torch.zeros(m, dtype=torch.bool)
    first = {int((image_idx == i).nonzero()[0]) for i in range(n_images)}
    for j in range(m):
        if regions and j not in first:
            is_region[j] = True
            boxes[j] = torch.tensor([8.0 * (j % 4) + 3, 8.0 * (j % 3), 20.0 + j, 16.0])
    return {"images": torch.randn(n_images, 3, SIZE, SIZE, generator=g), "text_ids": ids, "text_atts": atts,
            "mlm_ids": mlm_ids, "mlm_labels": mlm_labels, "image_idx": image_idx, "boxes": boxes,
            "is_region": is_region, "skipped": {}, "keys": [str(i) for i in range(n_images)]}


def grid_of(mask_row, grid):
    return mask_row[1:].reshape(grid, grid)


def test_patch_mask_by_hand():
    # 32 px image, 8 px patches: a 4 x 4 grid, row-major after the CLS
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0],    # whole image: everything
                          [9.0, 1.0, 6.0, 6.0],      # columns floor(9/8)=1 .. ceil(15/8)=2, rows 0 .. 1
                          [30.0, 30.0, 10.0, 10.0],  # runs off the image: clipped to the last patch
                          [16.0, 8.0, 0.0, 0.0],     # zero size: still one patch (row 1, column 2)
                          [4.0, 4.0, 16.0, 8.0],     # columns 0 .. ceil(20/8)=3, rows 0 .. ceil(12/8)=2
                          [-5.0, 20.0, 10.0, 30.0]])  # negative x clipped to column 0; rows 2 .. 4 clipped
    m = patch_mask(grid_boxes(boxes, 32, 8), 4)
    assert m.shape == (6, 17) and m.dtype == torch.bool and m[:, 0].all()
    expected = torch.zeros(6, 4, 4, dtype=torch.bool)
    expected[0] = True
    expected[1, 0, 1] = True
    expected[2, 3, 3] = True
    expected[3, 1, 2] = True
    expected[4, 0:2, 0:3] = True
    expected[5, 2:4, 0:1] = True
    for j in range(6):
        assert torch.equal(grid_of(m[j], 4), expected[j]), j


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_region_token_is_the_mean_of_the_patches_in_the_box(impl):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 16, 5, generator=g)  # 3 images, a 4 x 4 grid
    boxes = torch.tensor([[0.0, 0, 32, 32], [8, 8, 1, 1], [9, 0, 20, 15], [31, 31, 1, 1]])  # pixels, 8 px patches
    image_idx = torch.tensor([0, 2, 2, 1])
    mask = patch_mask(grid_boxes(boxes, 32, 8), 4)[:, 1:]
    out = box_pool(feats, grid_boxes(boxes, 32, 8), image_idx, 4, impl)
    for j in range(4):
        inside = [feats[image_idx[j], p] for p in range(16) if mask[j, p]]
        assert torch.allclose(out[j], torch.stack(inside).mean(0), atol=1e-5)
    assert torch.allclose(out[0], feats[0].mean(0), atol=1e-5)  # the whole image: its mean token


def test_fusion_with_shared_image_keys_equals_per_text_sequences():
    """Per-image keys/values gathered by index, with a per-text token 0, give what the fusion encoder gives on
    explicitly built per-text visual sequences."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(7)
    vis = torch.randn(3, 1 + 64, 64, generator=g)
    index = torch.tensor([2, 0, 0, 1, 2])
    first = torch.randn(5, 64, generator=g)
    txt = torch.randn(5, 6, 64, generator=g)
    atts = torch.ones(5, 6, dtype=torch.long)
    atts[1, 4:] = 0
    mask = torch.rand(5, 65, generator=g) > 0.3
    mask[:, 0] = True
    seq = torch.cat([first[:, None], vis[index, 1:]], 1)
    with torch.no_grad():
        expected = model.fuse(txt, atts, seq, mask)
        assert torch.allclose(model.fuse(txt, atts, vis, mask, index, first), expected, atol=1e-5)
        whole = model.fuse(txt, atts, vis[index], mask)
        assert torch.allclose(model.fuse(txt, atts, vis, mask, index), whole, atol=1e-5)
        assert not torch.allclose(whole, expected, atol=1e-3)  # token 0 matters


def test_box_targets_are_normalised_centre_boxes():
    b = torch.tensor([[0.0, 0.0, 64.0, 64.0], [8.0, 16.0, 16.0, 32.0]])
    assert torch.allclose(xywh_to_cxcywh(b) / 64, torch.tensor([[0.5, 0.5, 1, 1], [0.25, 0.5, 0.25, 0.5]]))


def test_forward_losses_gradients_and_one_encoding_per_image():
    torch.manual_seed(0)
    model = tiny_model()
    calls = []
    model.vision.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    out = model(random_batch(torch.Generator().manual_seed(1)), PRETRAINING)
    assert set(out) == {"itc", "itm", "mlm", "bbox", "giou", "loss", "itm_acc"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    w = tiny_cfg().loss
    weighted = sum(getattr(w, k) * out[k] for k in ("itc", "itm", "mlm", "bbox", "giou"))
    assert torch.allclose(out["loss"], weighted)
    assert calls == [3]  # three images, six texts: each image went through the encoder once
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_batch_without_regions_still_uses_every_parameter():
    model = tiny_model()
    out = model(random_batch(torch.Generator().manual_seed(4), texts_per_image=(1, 1, 1, 1), regions=False),
                PRETRAINING)
    assert "bbox" not in out and "giou" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_new_parameters_are_heads_fusion_and_temperature():
    model = tiny_model()
    new = set(model.new_parameter_names())
    assert "temperature.temp" in new and "itm_head.0.weight" in new and "mlm_head.decoder.weight" in new
    assert "fusion.layers.0.cross_attn.k.weight" in new and "vision_proj.proj.weight" in new
    assert not any(n.startswith(("vision.", "text.")) for n in new)
    assert not model.is_new_param("module.vision.vit.blocks.0.mlp.fc1.weight")
    assert model.is_new_param("module.bbox_head.3.bias")


def test_temperature_is_clamped():
    model = tiny_model()
    with torch.no_grad():
        model.temperature.temp.fill_(5.0)
    assert float(model.temperature().detach()) == pytest.approx(model.cfg.temp_max)
    with torch.no_grad():
        model.temperature.temp.fill_(-1.0)
    assert float(model.temperature().detach()) == pytest.approx(model.cfg.temp_min)


def test_inference_helpers_shapes():
    model = tiny_model().eval()
    batch = random_batch(torch.Generator().manual_seed(5))
    ids, atts = batch["text_ids"], batch["text_atts"]
    with torch.no_grad():
        vis = model.encode_image(batch["images"][:1])
        txt = model.encode_text(ids, atts)
        assert vis.shape == (1, 1 + 64, 64) and txt.shape == (6, 7, 64)
        assert torch.allclose(model.image_feat(vis).norm(dim=-1), torch.ones(1))
        assert model.text_feat(txt).shape == (6, 32)
        boxes = model.predict_boxes(batch["images"][:1], ids, atts)
        assert boxes.shape == (6, 4) and ((boxes > 0) & (boxes < 1)).all()
        assert torch.allclose(model.predict_boxes(vis.expand(6, -1, -1), ids, atts), boxes, atol=1e-5)
        assert model.itm_logits(txt, atts, vis.expand(6, -1, -1)).shape == (6, 2)


def test_forward_in_bf16_keeps_losses_in_fp32():
    model = tiny_model().to(torch.bfloat16)
    batch = random_batch(torch.Generator().manual_seed(6))
    batch["images"] = batch["images"].to(torch.bfloat16)
    out = model(batch, PRETRAINING)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()


def test_model_learns_a_fixed_batch():
    torch.manual_seed(0)
    model = tiny_model()
    batch = random_batch(torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(50):
        out = model(batch, PRETRAINING)
        first = float(out["loss"].detach()) if first is None else first
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        last = float(model(batch, PRETRAINING)["loss"])
        # ITC retrieval on the batch: every text finds its own visual sequence (region CLS) first.
        vis = model.encode_image(batch["images"])
        mask = patch_mask(grid_boxes(batch["boxes"], SIZE, 8), SIZE // 8)
        cls = box_pool(vis[:, 1:], grid_boxes(batch["boxes"], SIZE, 8), batch["image_idx"], SIZE // 8)
        txt = model.encode_text(batch["text_ids"], batch["text_atts"])
        sim = model.text_feat(txt) @ model.vision_proj(cls).T
        t2i_acc = float((sim.argmax(1) == torch.arange(len(sim))).float().mean())
        # MLM: the masked words are recovered.
        fused = model.fuse(model.encode_text(batch["mlm_ids"], batch["text_atts"]), batch["text_atts"], vis, mask,
                           batch["image_idx"], cls)
        masked = batch["mlm_labels"] != -100
        mlm_acc = float((model.mlm_head(fused[masked]).argmax(-1) == batch["mlm_labels"][masked]).float().mean())
    assert last < 0.5 * first, (first, last)
    assert t2i_acc >= 5 / 6 and mlm_acc == 1.0, (t2i_acc, mlm_acc)  # chance: 1/6 and 1/50


def test_xlm_roberta_text_encoder_by_configuration_alone():
    model = tiny_model("model.text.model_type=xlm-roberta", pad_id=1)
    assert type(model.text.encoder).__name__ == "XLMRobertaModel"
    out = model(random_batch(torch.Generator().manual_seed(3)), PRETRAINING)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_text_encoder_loads_a_local_checkpoint(tmp_path):
    cfg = tiny_cfg().model.text
    enc = TextEncoder(cfg, VOCAB, 0).eval()
    enc.encoder.save_pretrained(tmp_path / "bert")
    cfg.init_checkpoint = str(tmp_path / "bert")
    loaded = TextEncoder(cfg, VOCAB, 0).eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    atts = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.allclose(enc(ids, atts), loaded(ids, atts), atol=1e-5)


def test_vision_encoder_loads_pt_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    cfg = tiny_cfg().model.vision
    enc = VisionEncoder(cfg).eval()
    state = {k: v.contiguous() for k, v in enc.vit.state_dict().items()}
    torch.save({"model": state}, tmp_path / "vit.pt")
    save_file(state, str(tmp_path / "vit.safetensors"))
    images = torch.randn(2, 3, SIZE, SIZE)
    for name in ("vit.pt", "vit.safetensors"):
        cfg.init_checkpoint = str(tmp_path / name)
        loaded = VisionEncoder(cfg).eval()
        with torch.no_grad():
            assert torch.allclose(enc(images), loaded(images), atol=1e-5)
        assert loaded.load_checkpoint(cfg.init_checkpoint) == ([], [])


def test_beit2_base_builds_with_relative_position_bias_and_loads_a_beit_checkpoint(tmp_path):
    import timm

    cfg = load_config("base", ["model.vision.depth=1", "model.vision.image_size=64"])
    enc = VisionEncoder(cfg.model.vision)
    assert type(enc.vit).__name__ == "Beit"
    assert any("relative_position_bias_table" in n for n, _ in enc.named_parameters())
    out = enc(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1 + 16, 768)
    assert torch.allclose(out[:, 0], out[:, 1:].mean(1), atol=1e-5)
    # A classifier-style checkpoint at another resolution: final norm as fc_norm, a head, a larger bias table.
    other = timm.create_model("beitv2_base_patch16_224", pretrained=False, depth=1, img_size=96, num_classes=3)
    torch.save(other.state_dict(), tmp_path / "beit.pt")
    missing, unexpected = enc.load_checkpoint(str(tmp_path / "beit.pt"))
    assert missing == [] and unexpected == []
    assert torch.equal(enc.vit.norm.weight, other.fc_norm.weight)


def test_vit_from_scratch_starts_with_a_2d_sincos_position_table():
    from x2vlm.model.vision import VisionEncoder, sincos_2d

    table = sincos_2d(4, 8)
    assert table.shape == (16, 8)
    # the first half of the channels depends on the row only, the second half on the column only
    assert torch.equal(table[0, :4], table[3, :4]) and not torch.equal(table[0, :4], table[4, :4])
    assert torch.equal(table[0, 4:], table[4, 4:]) and not torch.equal(table[0, 4:], table[1, 4:])
    cfg = load_config("tiny", ["model.vision.depth=1"])
    enc = VisionEncoder(cfg.model.vision)
    grid = cfg.model.vision.image_size // cfg.model.vision.patch_size
    assert torch.equal(enc.vit.pos_embed[0, 1:].detach(), sincos_2d(grid, cfg.model.vision.width))
    assert enc.vit.pos_embed.requires_grad


def test_conv_stem_gives_tokens_on_the_patch_grid_and_refuses_what_it_cannot_be():
    from x2vlm.config import ConfigError
    from x2vlm.model.vision import ConvStem

    cfg = load_config("tiny", ["model.vision.depth=1"]).model.vision
    assert cfg.stem == "conv"  # the tiny preset trains its encoder from scratch
    enc = VisionEncoder(cfg)
    assert isinstance(enc.vit.patch_embed, ConvStem)
    assert ConvStem.widths(8, 128) == [32, 64, 128] and ConvStem.widths(16, 768) == [96, 192, 384, 768]
    grid = cfg.image_size // cfg.patch_size
    images = torch.randn(2, 3, SIZE, SIZE)
    out = enc(images)
    patch = VisionEncoder(dataclasses.replace(cfg, stem="patch"))(images)
    assert out.shape == patch.shape == (2, 1 + grid * grid, cfg.width)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.vit.patch_embed.parameters())
    with pytest.raises(ConfigError, match="power of two"):
        load_config("tiny", ["model.vision.patch_size=6", "model.vision.image_size=48"])
    with pytest.raises(ConfigError, match="embed_layer"):
        VisionEncoder(load_config("base", ["model.vision.depth=1", "model.vision.stem=conv"]).model.vision)


def test_conv_stem_refuses_weights_with_a_linear_patch_embedding(tmp_path):
    from x2vlm.config import ConfigError

    cfg = load_config("tiny", ["model.vision.depth=1"]).model.vision
    plain = VisionEncoder(dataclasses.replace(cfg, stem="patch"))
    torch.save(plain.vit.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(ConfigError, match="linear patch embedding"):
        VisionEncoder(dataclasses.replace(cfg, init_checkpoint=str(tmp_path / "vit.pt")))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors that autograd keeps for backward while `fn` runs."""
    seen = {}

    def pack(t):
        seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("style", [[], ["model.fusion.style=bert", "model.fusion.vision_positions=false"]],
                         ids=["pre-ln", "bert"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_less_kept(style):
    cfg = tiny_cfg("model.text.dropout=0.1", "model.fusion.dropout=0.1", "model.vision.drop_path=0.1",
                   "model.vision.depth=3", *style)
    torch.manual_seed(0)
    plain = X2VLM(cfg.model, vocab_size=VOCAB, pad_id=0)
    ckpt = X2VLM(dataclasses.replace(cfg.model, activation_checkpointing=["vision", "text", "fusion"]),
                 vocab_size=VOCAB, pad_id=0)
    ckpt.load_state_dict(plain.state_dict())
    batch = random_batch(torch.Generator().manual_seed(7))
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(11)  # dropout, drop path and the hard negatives draw the same numbers
        out, kept = saved_bytes(lambda m=model: m(batch, PRETRAINING))
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}, kept))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6)
    assert all(torch.allclose(grads_a[n], grads_b[n], rtol=0, atol=1e-6) for n in grads_a)
    assert any(g.abs().sum() > 0 for n, g in grads_b.items() if n.startswith(("vision.", "text.", "fusion.")))
    assert kept_b < 0.6 * kept_a, (kept_a, kept_b)


def test_text_keys_name_the_same_words_alike_on_every_rank():
    from x2vlm.objectives.pretraining import text_keys

    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 7, 9, 3, 0, 0], [2, 9, 7, 3, 0, 0], [2, 7, 9, 3, 5, 0]])
    atts = (ids != 0).long()
    keys = text_keys(ids, atts)
    assert keys[0] == keys[1] and len(set(keys.tolist())) == 3  # order matters, one more token matters
    shorter = text_keys(ids[:2, :4], atts[:2, :4])  # the same texts padded to another length
    assert torch.equal(shorter, keys[:2])
