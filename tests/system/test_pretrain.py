"""End to end on 2 CPU ranks: the deepspeed launcher runs ZeRO-2 pre-training, saves, resumes; a short run
improves held-out retrieval over the untrained model."""
import json

import pytest
import torch

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data

STEPS = 60


@pytest.fixture(scope="module")
def run(tmp_path_factory, launch):
    out = tmp_path_factory.mktemp("pretrain")
    paths = prepare_data(out, n_train=1200, n_heldout=100, seed=3, image_size=64, shards_per_source=4)
    cfg = update(load_config("tiny"), {
        "train.stages": [], "data.sources": [
            SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=24),
            SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=8, max_texts=5)],
        "model.text.tokenizer": str(out / "tokenizer"), "train.out_dir": str(out / "run"), "train.steps": STEPS,
        "train.save_every": STEPS // 2, "train.log_every": 10, "train.warmup_steps": 10, "train.precision": "fp32",
        "train.wandb_mode": "disabled"})
    save_config(cfg, out / "config.yaml")
    log = launch(out / "config.yaml")
    return out, paths, cfg, log


def test_two_rank_zero2_saves_and_resumes(run, launch):
    out, _, cfg, log = run
    assert "2 rank(s)" in log and "ZeRO-2" in log
    ckpts = out / "run" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step{STEPS}"
    assert (ckpts / f"step{STEPS // 2}" / "model.safetensors").exists()
    # Resume from the latest checkpoint and train 5 steps more. The loop checks that the loaded weights equal
    # the export saved with that checkpoint and says so.
    log2 = launch(out / "config.yaml", "--resume", "latest", f"train.steps={STEPS + 5}")
    assert f"resumed from step{STEPS}" in log2 and "equal to the saved export" in log2
    steps = [json.loads(line)["step"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == STEPS + 5 and steps.count(STEPS + 1) == 1
    from safetensors.torch import load_file
    a = load_file(str(ckpts / f"step{STEPS}" / "model.safetensors"))
    b = load_file(str(ckpts / f"step{STEPS + 5}" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a), "resumed training did not change the weights"


def test_short_training_improves_heldout_retrieval(run):
    from x2vlm.eval.retrieval import evaluate_retrieval
    from x2vlm.eval.run import evaluate_checkpoint, load_pool, make_tokenize
    from x2vlm.pretrained import build_model, load_pretrained

    out, paths, cfg, _ = run
    trained = evaluate_checkpoint(str(out / "run" / "checkpoints" / f"step{STEPS}"),
                                  image_shards=paths["heldout"])["image_retrieval"]
    _, tokenizer, _ = load_pretrained(out / "run" / "checkpoints" / f"step{STEPS}")
    torch.manual_seed(cfg.train.seed)
    untrained = build_model(cfg, tokenizer).eval()
    images, captions = load_pool(paths["heldout"], cfg.model.vision.image_size)
    ids, atts = make_tokenize(tokenizer, cfg.model.text.max_len)(captions)
    before = evaluate_retrieval(untrained, images, ids, atts)
    # mean rank of the true image over a pool of 100 falls clearly (about 50 when untrained)
    assert trained["t2i_mean_rank"] < 0.7 * before["t2i_mean_rank"], (before, trained)
    assert trained["t2i_r5"] > before["t2i_r5"]
