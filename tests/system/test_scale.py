"""Scale on CPU ranks: optimiser offload to the CPU with DeepSpeed's CPU Adam (the shipped offload configs), the
memory plan against measured peaks, and the base preset at its real size (BEiT-2 B/16 + 12 text + 6 fusion layers)
from local timm / transformers checkpoints with ZeRO-2 and ZeRO-3. All slow: run with --full."""
import json

import pytest
import torch
from safetensors.torch import load_file

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data

pytestmark = pytest.mark.full


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    paths = prepare_data(out, n_train=32, n_heldout=4, seed=11, image_size=64, shards_per_source=2)
    return out, paths


@pytest.mark.parametrize("ds", ["zero2_offload_bf16.json", "zero3_offload_bf16.json"])
def test_optimizer_offload_trains_with_cpu_adam(data, launch, ds):
    out, paths = data
    cfg = update(load_config("tiny"), {
        "train.stages": [], "data.sources": [
            SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=4),
            SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=2)],
        "model.text.tokenizer": str(out / "tokenizer"), "train.out_dir": str(out / ds), "train.steps": 3,
        "train.save_every": 3, "train.log_every": 1, "train.ds_config": ds, "train.wandb_mode": "disabled"})
    save_config(cfg, out / f"{ds}.yaml")
    log = launch(out / f"{ds}.yaml", ranks=2)
    assert f"ZeRO-{ds[4]}" in log
    rows = [json.loads(line) for line in (out / ds / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["skipped_steps"] == 0 for r in rows)
    weights = load_file(str(out / ds / "checkpoints" / "step3" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_plan_activation_estimate_matches_measured_peaks():
    """The plan's activations (measured at micro-batches 2 and 4, scaled) against peaks measured at 6 and 8."""
    from x2vlm.train.plan import activation_model, measure_activation

    cfg = load_config("base", ["model.vision.depth=4", "model.text.layers=4", "model.fusion.layers=2"])
    model = activation_model(cfg)
    for n in (6, 8):
        measured = measure_activation(cfg, n)["activation"]
        estimate = model["intercept"] + model["per_unit"] * n
        assert abs(estimate - measured) <= 0.2 * measured, (n, estimate, measured)


def test_the_readme_plan_example_prints_what_the_readme_says():
    """`x2vlm plan --config base --gpus 8 --gpu-memory 80 --micro-batch 32`, as the README writes it: model states
    per GPU as the README quotes them (they depend only on the parameter count), the largest micro-batch near the
    README's (activations are measured on this machine's CPU)."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    line = re.search(r"`x2vlm (plan --config base --gpus 8 --gpu-memory 80) \[--micro-batch 32\]", readme).group(1)
    p = subprocess.run([sys.executable, "-m", "x2vlm", *line.split(), "--micro-batch", "32"], capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads(p.stdout.strip().splitlines()[-1])
    quoted = re.search(r"prints ([\d.]+) GB of model states per GPU with ZeRO-2 \(([\d.]+) with ZeRO-3\)",
                       readme.replace("\n", " "))
    assert (plan["stages"]["zero2"]["model_states_gb"], plan["stages"]["zero3"]["model_states_gb"]) == pytest.approx(
        (float(quoted.group(1)), float(quoted.group(2))), abs=0.006)
    largest = int(re.search(r"at micro-batch 32 and at most (\d+)", readme.replace("\n", " ")).group(1))
    assert abs(plan["stages"]["zero2"]["largest_micro_batch"] - largest) <= 0.1 * largest, plan


@pytest.fixture(scope="module")
def base_checkpoints(data):
    """BEiT-2 B/16 weights in timm's own format and a BERT-base folder in transformers' own format (random
    weights: nothing can be downloaded), and a tokenizer."""
    import timm
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    out, _ = data
    torch.manual_seed(0)
    vit = timm.create_model("beitv2_base_patch16_224", pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(out / "beitv2_base.safetensors"))
    BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(str(out / "bert-base"))
    return out / "beitv2_base.safetensors", out / "bert-base"


@pytest.mark.parametrize("ds", ["zero2_bf16.json", "zero3_bf16.json"])
def test_base_preset_trains_resumes_exports_and_evaluates(data, base_checkpoints, launch, ds):
    from x2vlm.eval.run import evaluate_checkpoint

    out, paths = data
    vision, text = base_checkpoints
    cfg = update(load_config("base"), {
        "model.vision.init_checkpoint": str(vision), "model.text.init_checkpoint": str(text),
        "model.text.tokenizer": str(out / "tokenizer"), "data.num_workers": 1,
        "data.sources.0.shards": paths["train"], "data.sources.1.shards": paths["train"],
        "data.sources.0.batch_size": 2, "data.sources.1.batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
        "train.save_every": 1, "train.log_every": 1, "train.ds_config": ds, "train.wandb_mode": "disabled",
        "train.out_dir": str(out / f"base-{ds}")})
    save_config(cfg, out / f"base-{ds}.yaml")
    log = launch(out / f"base-{ds}.yaml")
    assert f"ZeRO-{ds[4]}" in log and "2 rank(s)" in log
    params = float(log.split("(images, regions): ")[1].split("M parameters")[0])
    assert 250 < params < 300  # BEiT-2 B/16 + BERT-base + 6 fusion layers + heads
    ckpts = out / f"base-{ds}" / "checkpoints"
    uninterrupted = load_file(str(ckpts / "step2" / "model.safetensors"))
    (ckpts / "latest").write_text("step1")
    log = launch(out / f"base-{ds}.yaml", "--resume", "latest")  # step 2 again, from step 1's checkpoint
    assert "resumed from step1" in log and "steps 1..2" in log
    again = load_file(str(ckpts / "step2" / "model.safetensors"))
    assert set(again) == set(uninterrupted) and all(torch.equal(again[k], uninterrupted[k]) for k in again)
    result = evaluate_checkpoint(str(ckpts / "step2"), image_shards=paths["heldout"])
    assert result["image_size"] == 224 and result["image_retrieval"]["pool_size"] == 4
