"""The X2-VLM-compatible architecture: BERT post-LN fusion layers (bidirectional, equal to transformers' BertLayer
on the same weights, the shared-image interface), the BEiT-2 vision tower with its fc_norm rule and CLIP pixel
statistics (equal to timm), and that the model of this style trains."""
import pytest
import torch

import x2vlm  # noqa: F401  (installs the torchvision shim before timm / transformers load)
from x2vlm.config import ConfigError, load_config
from x2vlm.model import X2VLM
from x2vlm.model.vision import PIXEL_STATS, VisionEncoder
from x2vlm.objectives import Pretraining

VOCAB = 50
SIZE = 64
WIDTH = 64


def bert_cfg(*extra):
    """The x2vlm-base layout, shrunk: BEiT-2 at 64 px with 16 px patches, 64 wide, 2 blocks; BERT 2 layers + 2
    BERT fusion layers, 64 wide."""
    return load_config("x2vlm-base", [
        f"model.vision.image_size={SIZE}", f"model.vision.width={WIDTH}", "model.vision.depth=2",
        "model.vision.heads=2", "model.vision.drop_path=0.0", f"model.text.hidden_size={WIDTH}",
        "model.text.layers=2", "model.text.heads=2", "model.text.intermediate_size=128", "model.text.dropout=0.0",
        "model.fusion.layers=2", "model.fusion.heads=2", "model.fusion.intermediate_size=128",
        "model.fusion.dropout=0.0", "model.embed_dim=32", *extra])


def bert_model(*extra):
    torch.manual_seed(0)
    return X2VLM(bert_cfg(*extra).model, vocab_size=VOCAB, pad_id=0)


def test_presets_build_the_published_layout_and_the_defaults_stay():
    base = load_config("x2vlm-base").model
    assert (base.fusion.style, base.vision.final_norm, base.vision.pixels, base.video.aggregator) == \
        ("bert", "patches", "clip", "mean")
    tiny = load_config("tiny").model
    assert (tiny.fusion.style, tiny.vision.final_norm, tiny.vision.pixels) == ("prenorm", "tokens", "half")
    with pytest.raises(ConfigError, match="fusion.vision_positions: the bert fusion style"):
        load_config("tiny", ["model.fusion.style=bert"])


def test_bert_fusion_self_attention_is_bidirectional():
    """Changing a later token changes an earlier token's output (a causal mask would not let it); changing a
    padding token changes nothing."""
    model = bert_model().eval()
    g = torch.Generator().manual_seed(1)
    txt = torch.randn(2, 6, WIDTH, generator=g)
    atts = torch.ones(2, 6, dtype=torch.long)
    atts[1, 4:] = 0
    vis = torch.randn(2, 1 + 16, WIDTH, generator=g)
    with torch.no_grad():
        base = model.fuse(txt, atts, vis)
        later = txt.clone()
        later[:, 3] += 1.0
        changed = model.fuse(later, atts, vis)
        padded = txt.clone()
        padded[1, 5] += 1.0
        same = model.fuse(padded, atts, vis)
    assert (changed[:, 0] - base[:, 0]).abs().max() > 1e-3
    assert torch.allclose(same[:, :4], base[:, :4], atol=1e-6) and torch.allclose(same[0], base[0])


def test_bert_fusion_equals_transformers_bert_layers_on_the_same_weights():
    """Our layers against transformers' BertLayer with cross-attention (eager attention, the additive masks
    given explicitly: BertLayer itself needs is_decoder=True for cross-attention). The model-level decoder is
    causal, which X2-VLM's fusion is not."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertLayer, BertModel

    model = bert_model().eval()
    hf_cfg = BertConfig(hidden_size=WIDTH, num_attention_heads=2, intermediate_size=128, is_decoder=True,
                        add_cross_attention=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        attn_implementation="eager")
    layers = torch.nn.ModuleList(BertLayer(hf_cfg) for _ in range(2)).eval()
    ours = model.fusion.state_dict()
    missing, unexpected = layers.load_state_dict({k.removeprefix("layer."): v for k, v in ours.items()},
                                                 strict=False)
    assert missing == [] and unexpected == []
    g = torch.Generator().manual_seed(2)
    txt = torch.randn(3, 5, WIDTH, generator=g)
    atts = torch.ones(3, 5, dtype=torch.long)
    atts[2, 3:] = 0
    vis = torch.randn(3, 17, WIDTH, generator=g)
    vis_mask = torch.rand(3, 17, generator=g) > 0.3
    vis_mask[:, 0] = True
    big = torch.finfo(torch.float32).min
    self_mask = (1.0 - atts[:, None, None, :].float()) * big  # [M, 1, 1, L], bidirectional
    cross_mask = (1.0 - vis_mask[:, None, None, :].float()) * big
    with torch.no_grad():
        expected = txt
        for layer in layers:
            expected = layer(expected, self_mask, encoder_hidden_states=vis, encoder_attention_mask=cross_mask)
        got = model.fuse(txt, atts, vis, vis_mask)
    assert torch.allclose(got, expected, atol=1e-5)
    # transformers' own model with this configuration masks later tokens: token 0 then ignores token 3.
    decoder = BertModel(hf_cfg, add_pooling_layer=False).eval()
    later = txt.clone()
    later[:, 3] += 1.0
    with torch.no_grad():
        a = decoder(inputs_embeds=txt, attention_mask=atts, encoder_hidden_states=vis).last_hidden_state
        b = decoder(inputs_embeds=later, attention_mask=atts, encoder_hidden_states=vis).last_hidden_state
    assert torch.allclose(a[:, 0], b[:, 0], atol=1e-6)


def test_bert_fusion_with_shared_image_keys_equals_per_text_sequences():
    model = bert_model().eval()
    g = torch.Generator().manual_seed(3)
    vis = torch.randn(3, 17, WIDTH, generator=g)
    index = torch.tensor([2, 0, 0, 1, 2])
    first = torch.randn(5, WIDTH, generator=g)
    txt = torch.randn(5, 6, WIDTH, generator=g)
    atts = torch.ones(5, 6, dtype=torch.long)
    atts[1, 4:] = 0
    mask = torch.rand(5, 17, generator=g) > 0.3
    mask[:, 0] = True
    with torch.no_grad():
        expected = model.fuse(txt, atts, torch.cat([first[:, None], vis[index, 1:]], 1), mask)
        assert torch.allclose(model.fuse(txt, atts, vis, mask, index, first), expected, atol=1e-5)
        assert torch.allclose(model.fuse(txt, atts, vis, mask, index), model.fuse(txt, atts, vis[index], mask),
                              atol=1e-5)


def test_vision_tower_is_timm_beit2_with_fc_norm_on_the_patches_and_clip_pixels():
    """Images normalised with mean = std = 0.5 (the pipeline's) give what timm's BEiT-2 gives on the same
    pixels normalised with CLIP's statistics: patch tokens fc_norm-ed, the [CLS] output dropped, their mean
    first."""
    import timm

    cfg = bert_cfg().model.vision
    torch.manual_seed(4)
    enc = VisionEncoder(cfg).eval()
    ref = timm.create_model("beitv2_base_patch16_224", pretrained=False, img_size=SIZE, embed_dim=WIDTH, depth=2,
                            num_heads=2, num_classes=0, global_pool="avg").eval()
    ref.load_state_dict(enc.vit.state_dict())  # strict: the same names and shapes
    names = set(enc.state_dict())
    assert "vit.fc_norm.weight" in names and not any(k.startswith("vit.norm.") for k in names)
    pixels = torch.rand(2, 3, SIZE, SIZE)  # in [0, 1]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in PIXEL_STATS["clip"])
    with torch.no_grad():
        got = enc((pixels - 0.5) / 0.5)
        patches = ref.fc_norm(ref.forward_features((pixels - mean) / std)[:, 1:])
    assert got.shape == (2, 1 + (SIZE // 16) ** 2, WIDTH)
    assert torch.allclose(got[:, 1:], patches, atol=1e-5)
    assert torch.allclose(got[:, 0], patches.mean(1), atol=1e-5)


def test_bert_style_model_trains_every_part():
    """One forward of the pre-training objective reaches every parameter, and a fixed batch is learnt."""
    model = bert_model()
    g = torch.Generator().manual_seed(5)
    m = 4
    ids = torch.randint(5, VOCAB, (m, 7), generator=g)
    ids[:, 0] = 2
    atts = torch.ones(m, 7, dtype=torch.long)
    mlm_ids, mlm_labels = ids.clone(), torch.full((m, 7), -100)
    mlm_labels[:, 2], mlm_ids[:, 2] = ids[:, 2], 4
    batch = {"images": torch.randn(3, 3, SIZE, SIZE, generator=g), "text_ids": ids, "text_atts": atts,
             "mlm_ids": mlm_ids, "mlm_labels": mlm_labels, "image_idx": torch.tensor([0, 1, 2, 2]),
             "boxes": torch.tensor([[0.0, 0, SIZE, SIZE]] * 3 + [[8.0, 16, 24, 32]]),
             "is_region": torch.tensor([False, False, False, True])}
    objective = Pretraining(bert_cfg().loss)
    out = model(batch, objective)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = float(out["loss"].detach())
    for _ in range(30):
        opt.zero_grad()
        loss = model(batch, objective)["loss"]
        loss.backward()
        opt.step()
    assert float(model(batch, objective)["loss"]) < 0.5 * first


def test_bert_fusion_starts_from_the_top_text_layers_when_the_text_encoder_is_loaded(tmp_path):
    """As X2-VLM initialises its fusion layers from BERT's last layers: self-attention and feed-forward copied
    from the loaded text encoder's top layers, cross-attention fresh."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(6)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=128), add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    model = bert_model(f"model.text.init_checkpoint={tmp_path / 'bert'}", "model.text.layers=3")
    text = model.text.encoder.encoder.layer
    for own, src in zip(model.fusion.layer, (text[1], text[2])):
        assert torch.equal(own.attention.self.query.weight, src.attention.self.query.weight)
        assert torch.equal(own.output.dense.weight, src.output.dense.weight)
        assert not torch.equal(own.crossattention.self.query.weight, src.attention.self.query.weight)
