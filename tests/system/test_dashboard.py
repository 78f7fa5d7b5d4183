"""The dashboard on 2 CPU ranks under the deepspeed launcher, wandb offline: a two-stage ZeRO-2 run (images +
regions, then + video) with held-out evaluation logs the per-step numbers reduced over ranks, FLOPs and MFU, data
loading and memory; its evaluations (retrieval, grounding, video retrieval, direction probe) come with their
protocols, pictures and tables, in eval.jsonl and in the offline wandb run; evaluating changes nothing in training
(bitwise-equal weights without it); a ZeRO-3 video QA run evaluates its partitioned weights exactly as `x2vlm
evaluate` does its export; `x2vlm report` writes a page whose pictures exist. And the reduction itself on 2 gloo
ranks: the global average is the mean of the ranks' means."""
import glob
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data
from x2vlm.distributed import free_port

STEPS = 4  # 2 image steps, then 2 with video
EVERY = 2


def offline(config: Path) -> dict:
    """Environment for a run with wandb offline, its files kept beside the run's configuration."""
    return {"WANDB_MODE": "offline", "WANDB_DATA_DIR": str(config.parent / "wandb-data")}


def records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("dashboard")
    paths = prepare_data(out, n_train=48, n_heldout=12, seed=5, image_size=64, shards_per_source=4,
                         n_train_clips=16, n_heldout_clips=6)
    return out, paths


@pytest.fixture(scope="module")
def pretrained(data, two_stage_config, launch):
    """The ZeRO-2 run with evaluation every 2 steps, and the same run without evaluation."""
    out, paths = data
    cfg = two_stage_config(out, paths, (2, 2), **{
        "train.save_every": STEPS, "train.warmup_steps": 1, "train.wandb_mode": "offline",
        "train.out_dir": str(out / "run"),
        "train.eval_every": EVERY, "train.eval.images": paths["heldout"], "train.eval.regions": paths["heldout"],
        "train.eval.videos": paths["video_retrieval_test"], "train.eval.max_frames": 3, "train.eval.examples": 3,
        "train.eval.rerank_k": 4})
    save_config(cfg, out / "config.yaml")
    log = launch(out / "config.yaml", env=offline(out / "config.yaml"))
    launch(out / "config.yaml", f"train.out_dir={out / 'plain'}", "train.eval_every=0", "train.wandb_mode=disabled")
    return out, paths, log


def test_per_step_numbers_are_reduced_over_ranks(pretrained):
    out, _, log = pretrained
    assert "2 rank(s)" in log and "ZeRO-2" in log and "peak" in log
    rows = records(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        for key in ("loss", "images/itc", "regions/bbox", "lr", "temp", "grad_norm", "samples_per_s",
                    "data_wait_s_per_step", "data_wait_frac", "seen", "stage", "skipped_steps"):
            assert key in r, key  # the keys there were before
        for key in ("loss_max", "images/itc_max", "images_per_s", "region_texts_per_s", "step_time_s",
                    "data_load_pct", "data_load_pct_max", "tflops_per_device", "mfu_pct", "hfu_pct",
                    "memory/peak_rss_gb", "images/flops_pct"):
            assert key in r, key
        assert r["loss_max"] >= r["loss"] and r["images/itc_max"] >= r["images/itc"]
        assert 0 < r["mfu_pct"] < r["hfu_pct"] < 300 and 0 <= r["data_load_pct"] <= r["data_load_pct_max"] <= 100
    # the two ranks see other batches: the largest rank's loss is above the mean over ranks
    assert all(r["loss_max"] > r["loss"] for r in rows)
    video = rows[-1]
    assert video["clips_per_s"] > 0 and video["frames_per_s"] >= video["clips_per_s"] and "videos/loss" in video
    assert "clips_per_s" not in rows[0]


def test_evaluation_during_training(pretrained):
    out, paths, log = pretrained
    evals = records(out / "run" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2, 4]
    last = evals[-1]
    assert last["image_retrieval"]["protocol"] == {
        "weights": "live, step 4", "split": "heldout", "shards": ["heldout-000000.tar"], "image_size": 64,
        "rerank_k": 4, "n_queries": 12, "pool_size": 12}
    assert last["grounding"]["n"] > 0 and last["video_retrieval"]["pool_size"] == 6
    assert set(last["video_direction"]) >= {"attention", "mean", "protocol"}
    examples = last["image_retrieval"]["examples"]
    assert len(examples) == 3 and all(len(e["top"]) == 5 and e["rank"] >= 0 for e in examples)
    for e in examples:
        assert all((out / "run" / f).exists() for f in e["files"].values())
    g = last["grounding"]["examples"][0]
    assert len(g["phrases"]) == len(g["truth"]) == len(g["pred"]) >= 2 and (out / "run" / g["file"]).exists()
    assert "held-out evaluation at step 4: image_retrieval/t2i_r1" in log
    # the untrained model (step 0) is the same in both stages' runs: evaluation at the run's end differs from it
    assert evals[0]["grounding"]["mean_iou"] != last["grounding"]["mean_iou"]


def test_evaluating_changes_nothing_in_training(pretrained):
    out, _, _ = pretrained
    a = load_file(str(out / "run" / "checkpoints" / f"step{STEPS}" / "model.safetensors"))
    b = load_file(str(out / "plain" / "checkpoints" / f"step{STEPS}" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    plain = records(out / "plain" / "metrics.jsonl")
    assert [r["loss"] for r in plain] == [r["loss"] for r in records(out / "run" / "metrics.jsonl")]


def test_offline_wandb_run_has_the_numbers_a_table_and_boxes(pretrained):
    out, _, _ = pretrained
    runs = glob.glob(str(out / "run" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_dir = Path(runs[0])
    history = next(run_dir.glob("run-*.wandb")).read_bytes()
    for key in (b"mfu_pct", b"tflops_per_device", b"data_load_pct", b"images/itc_max", b"memory/peak_rss_gb",
                b"eval/image_retrieval/t2i_r1", b"eval/grounding/acc_iou50", b"eval/video_direction/attention"):
        assert key in history, key
    assert b"run_table" in history  # tables go with their thumbnails as run_table artifacts
    tables = sorted(run_dir.glob("files/media/table/eval/image_retrieval/examples_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[-1].read_text())
    assert table["columns"][:4] == ["query", "right answer", "rank (ITC)", "rank (ITM re-rank)"]
    assert len(table["data"]) == 3 and isinstance(table["data"][0][2], int)
    assert list(run_dir.glob("files/media/table/eval/video_retrieval/examples_*.table.json"))
    boxes = sorted(run_dir.glob("files/media/metadata/boxes2D/eval/grounding/*.boxes2D.json"))
    pictures = sorted(run_dir.glob("files/media/images/eval/grounding/*.png"))
    assert len(pictures) == 9 and len(boxes) == 18  # 3 pictures x 3 evaluations; true and predicted boxes
    drawn = [json.loads(p.read_text()) for p in boxes[:2]]
    assert all(d["box_data"] and d["box_data"][0]["domain"] == "pixel" for d in drawn)
    assert {d["box_data"][0]["class_id"] for d in drawn} == {0, 1}


def test_report_writes_a_page_whose_pictures_exist(pretrained):
    out, _, _ = pretrained
    p = subprocess.run([sys.executable, "-m", "x2vlm", "report", str(out / "run")], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    page = Path(p.stdout.strip().split("report: ")[-1])
    assert page == out / "run" / "report" / "index.html"
    text = page.read_text()
    sources = re.findall(r"<img src=['\"]([^'\"]+)['\"]", text)
    assert len(sources) > 20 and all((page.parent / s).stat().st_size > 100 for s in sources)
    for what in ("MFU", "data loading", "Grounding", "image retrieval", "video retrieval", "held-out evaluation"):
        assert what in text, what


@pytest.fixture(scope="module")
def videoqa_zero3(data, launch):
    """A 2-rank ZeRO-3 run of video QA from scratch, evaluated during training on the QA test split."""
    out, paths = data
    vocab = str(Path(paths["video_qa_train"][0]).parent / "ans2label.json")
    cfg = update(load_config("tiny"), {
        "data.sources": [SourceConfig(name="qa", kind="video_qa", shards=paths["video_qa_train"], batch_size=3,
                                      max_frames=3)],
        "train.stages": [], "train.steps": 2, "train.save_every": 2, "train.log_every": 1, "train.precision": "fp32",
        "train.warmup_steps": 1, "data.num_workers": 1, "model.video.max_frames": 4, "train.wandb_mode": "offline",
        "model.qa_answers": paths["answers"], "model.qa_vocab": vocab, "train.ds_config": "zero3_bf16.json",
        "model.text.tokenizer": str(out / "tokenizer"), "train.out_dir": str(out / "qa"), "train.eval_every": 2,
        "train.eval.videoqa": paths["video_qa_test"], "train.eval.max_frames": 3, "train.eval.examples": 2})
    save_config(cfg, out / "qa.yaml")
    log = launch(out / "qa.yaml", env=offline(out / "qa.yaml"))
    return out, paths, log


def test_zero3_evaluates_the_partitioned_weights_as_x2vlm_evaluate_does(videoqa_zero3):
    from x2vlm.eval.run import evaluate_checkpoint

    out, paths, log = videoqa_zero3
    assert "ZeRO-3" in log
    evals = records(out / "qa" / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 2]
    live = evals[-1]["video_qa"]
    exported = evaluate_checkpoint(str(out / "qa" / "checkpoints" / "step2"), videoqa_shards=paths["video_qa_test"],
                                   max_frames=3)["video_qa"]
    for key in ("acc", "n", "clips", "chance", "by_type"):
        assert live[key] == exported[key], key
    assert live["protocol"]["aggregator"] == "attention" and live["protocol"]["n_clips"] == 6
    e = live["examples"][0]
    assert {"answer", "predicted", "question", "type", "right"} <= set(e) and (out / "qa" / e["file"]).exists()


REDUCE = textwrap.dedent("""
    import json, sys
    import torch, torch.distributed as dist
    from x2vlm.config import SourceConfig, load_config
    from x2vlm.train.flops import FlopModel
    from x2vlm.train.telemetry import StepStats

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = load_config("tiny")
    stats = StepStats([SourceConfig(name="regions", kind="region")], FlopModel(cfg.model, 100),
                      torch.device("cpu"), peak_flops=1e11, start=0)
    # rank 0 logs losses 1 and 3 (mean 2), rank 1 logs 5 and 7 (mean 6); only rank 1 has a box loss
    for v in ([1.0, 3.0], [5.0, 7.0])[rank]:
        stats.losses("regions", {"loss": torch.tensor(v), **({"bbox": torch.tensor(v / 10)} if rank else {})})
        stats.total(torch.tensor(v))
    stats.batch("regions", {"keys": ["k"] * (4 + 2 * rank), "images": torch.zeros(4 + 2 * rank, 3, 64, 64),
                            "text_ids": torch.ones(5, 7, dtype=torch.long),
                            "mlm_labels": torch.full((5, 7), -100), "is_region": torch.ones(5, dtype=torch.bool)},
                wait_s=0.1 * rank)
    values = stats.reduce(2)
    json.dump(values, open(sys.argv[1] + f"/rank{rank}.json", "w"))
    dist.barrier()  # neither rank leaves while the other still talks to it
    dist.destroy_process_group()
""")


def test_reduction_over_two_ranks(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", REDUCE, str(tmp_path)],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=port, OMP_NUM_THREADS="1"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-3000:]
    finally:  # a rank that failed leaves the other waiting for it
        for p in procs:
            p.kill()
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a == b  # every rank gets the same numbers
    assert a["loss"] == pytest.approx((2 + 6) / 2) and a["loss_max"] == pytest.approx(6)
    assert a["regions/loss"] == pytest.approx(4) and a["regions/loss_max"] == pytest.approx(6)
    assert a["regions/bbox"] == pytest.approx(0.6) and a["regions/bbox_max"] == pytest.approx(0.6)
    wall = a["step_time_s"] * 2
    assert a["samples_per_s"] == pytest.approx(10 / wall)  # both ranks' samples
    assert a["images_per_s"] == pytest.approx(5 / wall)  # per device
    assert a["data_wait_s_per_step"] == pytest.approx(0.1 / 2 / 2)  # mean over ranks, per step
