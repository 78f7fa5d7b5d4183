"""The FLOP model (x2vlm.train.flops) against torch's FlopCounterMode on the real forward and backward of every
source kind's objective: tiny size here (default, checkpointed towers, X2-VLM's post-LN fusion, frozen vision),
the base presets with --full. The counter misses the CPU's fused attention kernel; it is given the counter's own
attention formulas for it."""
import pytest
import torch
import torch.utils.flop_counter as flop_counter
from torch.utils.flop_counter import FlopCounterMode

from x2vlm.config import load_config
from x2vlm.model import X2VLM
from x2vlm.objectives import for_source
from x2vlm.train.flops import GPU_PEAK_TFLOPS, FlopModel, peak_flops

aten = torch.ops.aten
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda g, q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_backward_flop_count(g, q, k, v),
}
VOCAB = 400
KINDS = ("image", "region", "video", "video_qa")


def counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)


def make_batch(kind: str, size: int, images: int = 2, length: int = 11, frames: int = 3) -> dict:
    """A batch in the loader's format: region batches with two texts per image (one a region), padding in one
    text, a few masked tokens, and one clip a frame shorter than the other."""
    g = torch.Generator().manual_seed(1)
    texts = images * (2 if kind == "region" else 1)
    ids = torch.randint(5, VOCAB, (texts, length), generator=g)
    atts = torch.ones(texts, length, dtype=torch.long)
    atts[0, -3:] = 0
    labels = torch.full((texts, length), -100)
    labels[:, 2] = ids[:, 2]
    labels[0, 4] = ids[0, 4]
    batch = {"text_ids": ids, "text_atts": atts, "mlm_ids": ids.clone(), "mlm_labels": labels,
             "image_idx": torch.arange(images).repeat_interleave(texts // images),
             "boxes": torch.tensor([[4.0, 4.0, size / 2, size / 2]] * texts),
             "is_region": torch.tensor([kind == "region" and i % 2 == 1 for i in range(texts)])}
    if kind in ("video", "video_qa"):
        batch["videos"] = torch.randn(images, frames, 3, size, size, generator=g)
        batch["frame_mask"] = torch.ones(images, frames, dtype=torch.bool)
        batch["frame_mask"][0, -1] = False
    else:
        batch["images"] = torch.randn(images, 3, size, size, generator=g)
    if kind == "video_qa":
        batch["answer_labels"] = torch.ones(images, dtype=torch.long)
    return batch


def compare(preset: str, overrides: list, kinds=KINDS) -> list:
    """(kind, model forward / counted forward, model forward + backward + recomputation / counted) per kind."""
    cfg = load_config(preset, ["model.qa_answers=7", *overrides])
    torch.manual_seed(0)
    model = X2VLM(cfg.model, vocab_size=VOCAB, pad_id=0).train()
    flops = FlopModel(cfg.model, VOCAB, itc_impl=cfg.loss.itc_impl)
    out = []
    for kind in kinds:
        batch = make_batch(kind, cfg.model.vision.image_size)
        objective = for_source(kind, cfg.loss)
        with counter() as fwd:
            losses = model(batch, objective)
        with counter() as bwd:
            losses["loss"].backward()
        forward, backward = fwd.get_total_flops(), bwd.get_total_flops()
        model.zero_grad(set_to_none=True)
        est = flops.batch(kind, batch)
        out.append((kind, est.forward / forward, est.hardware / (forward + backward)))
    return out


TINY = {
    "default": [],
    "checkpointed, post-LN fusion, plain ITC and box pooling":
        ["model.activation_checkpointing=[vision,text,fusion]", "model.fusion.style=bert",
         "model.fusion.vision_positions=false", "loss.itc_impl=reference", "model.box_pool_impl=reference"],
    "the ViT's patch embedding instead of the convolutional stem": ["model.vision.stem=patch"],
    "frozen vision, mean over frames, vision checkpointed":
        ["model.vision.frozen=true", "model.video.aggregator=mean", "model.activation_checkpointing=[vision]"],
}


@pytest.mark.parametrize("setting", list(TINY))
def test_tiny_model_flops_match_the_counter(setting):
    for kind, fwd, total in compare("tiny", TINY[setting]):
        assert abs(fwd - 1) < 1e-3 and abs(total - 1) < 5e-3, (kind, fwd, total)


@pytest.mark.full
@pytest.mark.parametrize("preset", ["base", "x2vlm-base"])
def test_base_model_flops_match_the_counter(preset):
    # at base size the text and fusion attention runs unfused (dropout) and the BEiT attention too (its bias is
    # learnt): their backward recomputes nothing, which the model's attention-recompute term counts; within 1%
    extra = ["model.activation_checkpointing=[vision,text,fusion]"] if preset == "x2vlm-base" else []
    for kind, fwd, total in compare(preset, extra):
        assert abs(fwd - 1) < 1e-3 and abs(total - 1) < 0.01, (kind, fwd, total)


def test_the_parts_of_a_step():
    cfg = load_config("tiny", ["model.activation_checkpointing=[text]"])
    flops = FlopModel(cfg.model, VOCAB, world=2)
    one = flops.pretraining(images=4, texts=4, length=10, masked=6, regions=0)
    assert one.backward > 1.9 * one.forward and one.model == one.forward + one.backward
    assert one.recompute > 0 and one.hardware == one.model + one.recompute
    assert {"vision", "text", "fusion", "itc", "itm", "mlm"} <= set(one.parts) and "box" not in one.parts
    more = flops.pretraining(images=4, texts=8, length=10, masked=6, regions=4)
    assert more.parts["vision"] == one.parts["vision"] and more.parts["text"] == 2 * one.parts["text"]
    assert "box" in more.parts
    # ITC against every rank's texts: a second rank adds columns
    alone = FlopModel(cfg.model, VOCAB, world=1).pretraining(images=4, texts=4, length=10, masked=6, regions=0)
    assert one.parts["itc"] > alone.parts["itc"]


def test_peak_flops():
    rate, where = peak_flops("cpu", "fp32")
    assert rate > 1e8 and where.startswith("measured fp32 matmul on cpu")
    assert dict(GPU_PEAK_TFLOPS)["H100"]["bf16"] == 989.0 and dict(GPU_PEAK_TFLOPS)["A100"]["bf16"] == 312.0
