"""Exact resume on 2 CPU ranks under the deepspeed launcher, for ZeRO-1, -2 and -3: a two-stage run (images +
regions, then + video) is killed with SIGKILL (every process of the launch, by process id) at random steps (twice
for ZeRO-2, once for the others) and resumed with `--resume latest` each time. It must end with weights bitwise
equal to an uninterrupted run and with every training sample used exactly as often, in the same steps. ZeRO-1/2
checkpoints continue on 1 rank (re-sharded); a ZeRO-3 checkpoint refuses to, and its weights start a ZeRO-3 stage
from an export, which is exported and evaluated."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from x2vlm.config import save_config
from x2vlm.demo.run import prepare_data

STEPS = 8  # 4 image steps, then 4 video steps; an epoch of a rank's images is 5 batches: the streams wrap
ZERO = {1: 1, 2: 2, 3: 1}  # ZeRO stage: times a run is killed


@pytest.fixture(scope="module")
def setup(tmp_path_factory, launch, two_stage_config):
    out = tmp_path_factory.mktemp("resume")
    paths = prepare_data(out, n_train=40, n_heldout=4, seed=7, image_size=64, shards_per_source=4,
                         n_train_clips=16, n_heldout_clips=2)
    cfg = two_stage_config(out, paths, (4, 4), **{"train.save_every": 2, "train.sample_log": True,
                                                   "train.warmup_steps": 2})
    save_config(cfg, out / "config.yaml")
    return out


@pytest.fixture(scope="module")
def whole(setup, launch):
    """whole(stage): the folder of an uninterrupted run with ZeRO-`stage` (made once per stage)."""
    made = {}

    def run(stage: int):
        if stage not in made:
            launch(setup / "config.yaml", f"train.out_dir={setup / f'whole{stage}'}",
                   f"train.ds_config=zero{stage}_bf16.json")
            made[stage] = setup / f"whole{stage}"
        return made[stage]
    return run


def logged_steps(run_dir):
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max([json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()], default=0)


def kill_at(proc, run_dir, step):
    """SIGKILL every process of the launch (launcher, ranks, loader workers) once rank 0 has logged `step` and a
    checkpoint exists."""
    deadline = time.time() + 300
    while logged_steps(run_dir) < step or not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run did not reach the step"
        time.sleep(0.05)
    pids = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def samples(run_dir):
    """[(step, source, key)] of both ranks."""
    out = []
    for rank in (0, 1):
        for line in (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines():
            r = json.loads(line)
            out += [(r["step"], r["source"], rank, k) for k in r["keys"]]
    return sorted(out)


def final_weights(run_dir):
    return load_file(str(run_dir / "checkpoints" / f"step{STEPS}" / "model.safetensors"))


# ZeRO-2, killed twice, runs by default; ZeRO-1 and ZeRO-3 (the slowest) with --full.
@pytest.mark.parametrize("stage", [pytest.param(z, id=f"zero{z}", marks=() if z == 2 else pytest.mark.full)
                                   for z in sorted(ZERO)])
def test_kill_9_then_resume_is_bitwise_exact(setup, whole, launch, start_launch, stage):
    out = setup
    rng = random.Random()
    kills = [rng.randint(2, 4)]
    if ZERO[stage] == 2:
        kills.append(rng.randint(kills[0] + 2, STEPS - 1))
    print(f"ZeRO-{stage}: killing after steps {kills}")
    run_dir = out / f"killed{stage}"
    over = [f"train.out_dir={run_dir}", f"train.ds_config=zero{stage}_bf16.json"]
    for i, step in enumerate(kills):
        kill_at(start_launch(out / "config.yaml", *over, *(["--resume", "latest"] if i else [])), run_dir, step)
    log = launch(out / "config.yaml", *over, "--resume", "latest")
    resumed_at = int(re.search(r"steps (\d+)\.\.8", log).group(1))
    assert 2 <= resumed_at < STEPS and f"ZeRO-{stage}" in log
    uninterrupted, killed = final_weights(whole(stage)), final_weights(run_dir)
    assert set(uninterrupted) == set(killed)
    differ = [k for k in uninterrupted if not torch.equal(uninterrupted[k], killed[k])]
    assert not differ, f"killed after steps {kills}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    used_whole, used_killed = samples(whole(stage)), samples(run_dir)
    assert used_killed == used_whole
    per_key = Counter((source, key) for _, source, _, key in used_whole)
    assert len({s for s, _ in per_key}) == 3 and max(per_key.values()) >= 2  # three sources; some reused


RESHARD = textwrap.dedent("""
    import sys
    import torch
    from x2vlm import distributed
    from x2vlm.config import load_config
    from x2vlm.pretrained import build_model
    from x2vlm.train.checkpoint import Checkpointer
    from x2vlm.train.engine import build_ds_config, build_engine
    from x2vlm.train.loop import load_run_tokenizer
    from x2vlm.train.optim import build_optimizer
    from x2vlm.train.stages import plan_stages

    cfg = load_config(sys.argv[1], ["train.out_dir=" + sys.argv[2], "train.ds_config=" + sys.argv[4]])
    distributed.init()
    stage = plan_stages(cfg)[1]
    model = build_model(cfg, load_run_tokenizer(cfg))
    opt, sched = build_optimizer(model, stage.train_config(cfg.train))
    engine = build_engine(model, opt, sched, build_ds_config(cfg, 1, sources=stage.sources))
    Checkpointer(engine, cfg, {"world_size": 1, "num_workers": 1}).restore("step6")
    o = engine.optimizer
    torch.save({"state": [dict(o.optimizer.state[f]) for f in o.single_partition_of_fp32_groups],
                "fp32": [f.clone() for f in o.single_partition_of_fp32_groups],
                "lr": engine.lr_scheduler.get_last_lr()}, sys.argv[3])
""")


@pytest.mark.parametrize("stage", [pytest.param(1, id="zero1", marks=pytest.mark.full), pytest.param(2, id="zero2")])
def test_resharding_two_ranks_into_one_is_exact(setup, whole, single_process_env, stage):
    """On one rank a ZeRO partition is a whole parameter group: the re-sharded optimiser state must equal the two
    saved partitions laid end to end (padding cut), the step counts and the schedule must be the saved ones."""
    out = setup
    p = subprocess.run([sys.executable, "-c", RESHARD, str(out / "config.yaml"), str(whole(stage)),
                        str(out / f"resharded{stage}.pt"), f"zero{stage}_bf16.json"], env=single_process_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out / f"resharded{stage}.pt", weights_only=True)
    folder = whole(stage) / "checkpoints" / "step6"
    saved = [torch.load(folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)
             ["optimizer_state_dict"] for r in (0, 1)]
    for g, (state, fp32) in enumerate(zip(got["state"], got["fp32"])):
        n = fp32.numel()
        assert torch.equal(fp32, torch.cat([s["single_partition_of_fp32_groups"][g] for s in saved])[:n])
        for key in ("exp_avg", "exp_avg_sq"):
            whole = torch.cat([s["base_optimizer_state"]["state"][g][key] for s in saved])[:n]
            assert whole.abs().sum() > 0 and torch.equal(state[key], whole), (g, key)
        assert torch.equal(state["step"], saved[0]["base_optimizer_state"]["state"][g]["step"])
    model_state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)
    assert got["lr"] == model_state["lr_scheduler"]["_last_lr"]


def test_resume_on_one_rank_continues_exactly_the_weights(setup, whole, launch):
    import shutil

    out = setup
    run_dir = out / "one-rank"
    shutil.copytree(whole(2) / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "latest").write_text("step6")
    log = launch(out / "config.yaml", f"train.out_dir={run_dir}", "--resume", "latest", ranks=1)
    assert "resuming 2 rank(s) x 1 loader worker(s) as 1 x 1" in log and "steps 6..8" in log
    assert "resumed from step6" in log  # the weights loaded equal the saved export, bit for bit
    state = json.loads((run_dir / "checkpoints" / "step8" / "run_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == STEPS
    end, six = final_weights(run_dir), load_file(str(whole(2) / "checkpoints" / "step6" / "model.safetensors"))
    assert any(not torch.equal(end[k], six[k]) for k in end)


@pytest.mark.full
def test_zero3_checkpoint_refuses_another_number_of_ranks_and_its_weights_start_a_stage(setup, whole, launch):
    """A ZeRO-3 run on 1 rank from the 2-rank ZeRO-3 checkpoint is refused with what to do; its export starts
    the video stage alone under ZeRO-3 (--init), whose export at the end holds every weight and evaluates."""
    import shutil

    from x2vlm.eval.run import evaluate_checkpoint
    from x2vlm.launch import command

    out = setup
    run_dir = out / "zero3-one-rank"
    shutil.copytree(whole(3) / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "latest").write_text("step6")
    args = ["pretrain", "--config", out / "config.yaml", f"train.out_dir={run_dir}", "train.ds_config=zero3_bf16.json",
            "--resume", "latest"]
    p = subprocess.run(command(args, 1), env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled"),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode != 0 and "resumes on the number of ranks that wrote it" in p.stdout + p.stderr
    assert "--init" in p.stdout + p.stderr
    init = whole(3) / "checkpoints" / "step4"
    log = launch(out / "config.yaml", f"train.out_dir={out / 'zero3-init'}", "train.ds_config=zero3_bf16.json",
                 "--stage", "video", "--init", init)
    assert "ZeRO-3" in log and "steps 4..8" in log and f"weights from {init}" in log
    end, start = final_weights(out / "zero3-init"), load_file(str(init / "model.safetensors"))
    assert set(end) == set(start) and all(end[k].shape == start[k].shape for k in end)
    assert any(not torch.equal(end[k], start[k]) for k in end)
    heldout = sorted(str(p) for p in (out / "data").glob("heldout-*.tar"))
    result = evaluate_checkpoint(str(out / "zero3-init"), image_shards=heldout)
    assert result["image_retrieval"]["pool_size"] == 4
