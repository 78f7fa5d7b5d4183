"""Staged pre-training on 2 CPU ranks under the deepspeed launcher: stage 1 (images + regions), then stage 2
(images + regions + video) from stage 1's weights with a fresh optimiser; the hand-off is recorded; stage 2 run
alone from stage 1's checkpoint gives the same weights as within the full run."""
import json

import pytest
import torch
from safetensors.torch import load_file

from x2vlm.config import save_config
from x2vlm.demo.run import prepare_data
from x2vlm.pretrained import weights_sha256


@pytest.fixture(scope="module")
def staged(tmp_path_factory, launch, two_stage_config):
    out = tmp_path_factory.mktemp("stages")
    paths = prepare_data(out, n_train=160, n_heldout=10, seed=5, image_size=64, shards_per_source=4,
                         n_train_clips=48, n_heldout_clips=4)
    cfg = two_stage_config(out, paths, (3, 3), video_lr=2.0e-4, **{
        "data.sources.0.batch_size": 4, "data.sources.1.batch_size": 4, "data.sources.2.max_frames": 4,
        "train.save_every": 100, "model.video.aggregator": "attention", "train.out_dir": str(out / "run")})
    save_config(cfg, out / "config.yaml")
    log = launch(out / "config.yaml")
    return out, log


def test_stage_two_starts_from_stage_one_and_records_it(staged):
    out, log = staged
    ckpts = out / "run" / "checkpoints"
    assert "stage 'images' (images, regions)" in log and "stage 'video' (images, regions, videos)" in log
    state = json.loads((ckpts / "step6" / "run_state.json").read_text())
    assert state["stage"] == "video" and state["stage_begin"] == 3
    assert state["init_from"]["path"] == str(ckpts / "step3") and state["init_from"]["stage"] == "images"
    assert state["init_from"]["sha256"] == weights_sha256(ckpts / "step3")
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all("videos/itc" not in r for r in rows[:3]) and all("videos/itc" in r for r in rows[3:])
    assert rows[3]["lr"] < 2.0e-4 + 1e-12  # stage 2's own learning rate and a fresh warm-up
    a, b = load_file(str(ckpts / "step3" / "model.safetensors")), load_file(str(ckpts / "step6" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("temporal."))


def test_stage_two_alone_from_a_checkpoint_matches_the_full_run(staged, launch):
    out, _ = staged
    ckpts = out / "run" / "checkpoints"
    log = launch(out / "config.yaml", "--stage", "video", "--init", str(ckpts / "step3"),
                 f"train.out_dir={out / 'alone'}")
    assert "stage 'images'" not in log and "steps 3..6" in log
    alone = out / "alone" / "checkpoints" / "step6"
    state = json.loads((alone / "run_state.json").read_text())
    assert state["init_from"] == {"path": str(ckpts / "step3"), "sha256": weights_sha256(ckpts / "step3")}
    full, part = load_file(str(ckpts / "step6" / "model.safetensors")), load_file(str(alone / "model.safetensors"))
    assert all(torch.equal(full[k], part[k]) for k in full)


def test_a_later_stage_alone_takes_its_predecessors_weights_from_the_run_folder_or_refuses(staged, launch,
                                                                                         single_process_env):
    """`--stage video` without --init, in a folder holding stage 1's last checkpoint, starts from it (the full
    run's weights again), and so does `--stage video --resume` at that checkpoint; in a folder without it, it
    refuses in one line instead of starting from scratch; a resume outside the stage named is refused."""
    import shutil
    import subprocess
    import sys

    out, _ = staged
    ckpts = out / "run" / "checkpoints"
    shutil.copytree(ckpts / "step3", out / "again" / "checkpoints" / "step3")
    log = launch(out / "config.yaml", "--stage", "video", f"train.out_dir={out / 'again'}")
    assert f"weights from {out / 'again' / 'checkpoints' / 'step3'}" in log, log[-3000:]
    full = load_file(str(ckpts / "step6" / "model.safetensors"))
    again = load_file(str(out / "again" / "checkpoints" / "step6" / "model.safetensors"))
    assert all(torch.equal(full[k], again[k]) for k in full)
    p = subprocess.run([sys.executable, "-m", "x2vlm", "pretrain", "--config", str(out / "config.yaml"), "--stage",
                        "video", f"train.out_dir={out / 'empty'}"], env=single_process_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "x2vlm pretrain: error: --stage video: it starts from the weights stage 'images' ends with"), p.stderr[-2000:]
    assert not (out / "empty").exists()
    # resumed at the previous stage's last checkpoint, the stage starts from its weights too
    shutil.copytree(ckpts / "step3", out / "resumed" / "checkpoints" / "step3")
    log = launch(out / "config.yaml", "--stage", "video", "--resume", "step3", f"train.out_dir={out / 'resumed'}")
    resumed = load_file(str(out / "resumed" / "checkpoints" / "step6" / "model.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full), log[-2000:]
    p = subprocess.run([sys.executable, "-m", "x2vlm", "pretrain", "--config", str(out / "config.yaml"), "--stage",
                        "images", "--resume", "step6", f"train.out_dir={out / 'run'}"], env=single_process_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1] == (
        "x2vlm pretrain: error: --resume step6: step 6 is outside stage 'images' (steps 0..3)"), p.stderr[-2000:]
