"""The X2-VLM-style model (BERT fusion layers, BEiT-2 with fc_norm and CLIP pixels, mean over frames) trains with
everything else: 2 CPU ranks under the deepspeed launcher, ZeRO-2, the fused box pooling and contrastive ops, two
stages (images + regions, then video); its export loads with the style it was trained with."""
import json

import pytest
import torch

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data


@pytest.fixture(scope="module")
def run(tmp_path_factory, launch):
    out = tmp_path_factory.mktemp("official_style")
    paths = prepare_data(out, n_train=160, n_heldout=20, seed=5, image_size=64, shards_per_source=2,
                         n_train_clips=12, n_heldout_clips=4)
    cfg = load_config("x2vlm-base", [
        "model.vision.image_size=64", "model.vision.width=64", "model.vision.depth=2", "model.vision.heads=2",
        "model.vision.drop_path=0.0", "model.text.hidden_size=64", "model.text.layers=2", "model.text.heads=2",
        "model.text.intermediate_size=128", "model.fusion.layers=2", "model.fusion.heads=2",
        "model.fusion.intermediate_size=128", "model.embed_dim=32", "model.video.max_frames=4"])
    cfg = update(cfg, {
        "data.sources": [SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=8),
                         SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=4,
                                      max_texts=3),
                         SourceConfig(name="videos", kind="video", shards=paths["train_video"], batch_size=4,
                                      max_frames=4)],
        "train.stages": [{"name": "images", "steps": 6, "sources": ["images", "regions"]},
                         {"name": "video", "steps": 4, "sources": ["images", "regions", "videos"]}],
        "train.steps": 10, "train.save_every": 5, "train.warmup_steps": 2, "train.log_every": 1,
        "train.precision": "fp32", "data.num_workers": 1, "model.text.tokenizer": str(out / "tokenizer"),
        "train.out_dir": str(out / "run"), "train.wandb_mode": "disabled"})
    save_config(cfg, out / "config.yaml")
    return out, cfg, launch(out / "config.yaml")


def test_two_ranks_train_the_bert_style_model_in_two_stages(run):
    from x2vlm.pretrained import load_pretrained

    out, cfg, log = run
    assert "2 rank(s)" in log and "ZeRO-2" in log and "stage 'video'" in log
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows][-1] == 10
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert any("videos/itc" in r for r in rows) and any("regions/bbox" in r for r in rows)
    ckpts = out / "run" / "checkpoints"
    model, _, saved = load_pretrained(ckpts / "step10")
    assert saved.model.fusion.style == "bert" and type(model.fusion).__name__ == "BertFusionEncoder"
    from safetensors.torch import load_file

    a, b = load_file(str(ckpts / "step5" / "model.safetensors")), load_file(str(ckpts / "step10" / "model.safetensors"))
    for key in ("fusion.layer.1.crossattention.self.key.weight", "vision.vit.fc_norm.weight",
                "temporal.frame_embed", "text.encoder.encoder.layer.0.attention.self.query.weight"):
        assert not torch.equal(a[key], b[key]), key
