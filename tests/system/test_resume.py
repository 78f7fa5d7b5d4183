"""Exact resume on 2 CPU ranks under the deepspeed launcher: a two-stage run (images + regions, then + video) is
killed with SIGKILL (every process of the launch, by process id) at random steps, twice, and resumed with
`--resume latest` each time. It must end with weights bitwise equal to an uninterrupted run and with every
training sample used exactly as often, in the same steps. Then the same checkpoint continues on 1 rank."""
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

from x2vlm.config import SourceConfig, StageConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data

STEPS = 8  # 4 image steps, then 4 video steps; an epoch of a rank's images is 5 batches: the streams wrap


@pytest.fixture(scope="module")
def setup(tmp_path_factory, launch):
    out = tmp_path_factory.mktemp("resume")
    paths = prepare_data(out, n_train=40, n_heldout=4, seed=7, image_size=64, shards_per_source=4,
                         n_train_clips=16, n_heldout_clips=2)
    cfg = update(load_config("tiny"), {
        "data.sources": [SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=4),
                         SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=3),
                         SourceConfig(name="videos", kind="video", shards=paths["train_video"], batch_size=3,
                                      max_frames=3)],
        "train.stages": [StageConfig(name="images", steps=4, sources=["images", "regions"]),
                         StageConfig(name="video", steps=4, sources=["images", "regions", "videos"])],
        "train.steps": STEPS, "train.save_every": 2, "train.log_every": 1, "train.precision": "fp32",
        "train.wandb_mode": "disabled", "train.sample_log": True, "train.warmup_steps": 2, "data.num_workers": 1,
        "model.video.max_frames": 4, "model.text.tokenizer": str(out / "tokenizer")})
    save_config(cfg, out / "config.yaml")
    launch(out / "config.yaml", f"train.out_dir={out / 'whole'}")
    return out


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


def test_kill_9_twice_then_resume_is_bitwise_exact(setup, launch, start_launch):
    out = setup
    rng = random.Random()
    first = rng.randint(2, 4)
    second = rng.randint(first + 2, STEPS - 1)
    print(f"killing after steps {first} and {second}")
    run_dir = out / "killed"
    over = f"train.out_dir={run_dir}"
    kill_at(start_launch(out / "config.yaml", over), run_dir, first)
    kill_at(start_launch(out / "config.yaml", over, "--resume", "latest"), run_dir, second)
    log = launch(out / "config.yaml", over, "--resume", "latest")
    resumed_at = int(re.search(r"steps (\d+)\.\.8", log).group(1))
    assert 2 <= resumed_at <= second
    whole, killed = final_weights(out / "whole"), final_weights(run_dir)
    assert set(whole) == set(killed)
    differ = [k for k in whole if not torch.equal(whole[k], killed[k])]
    assert not differ, f"killed after steps {first}, {second}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    used_whole, used_killed = samples(out / "whole"), samples(run_dir)
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

    cfg = load_config(sys.argv[1], ["train.out_dir=" + sys.argv[2]])
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


def test_resharding_two_ranks_into_one_is_exact(setup, single_process_env):
    """On one rank a ZeRO partition is a whole parameter group: the re-sharded optimiser state must equal the two
    saved partitions laid end to end (padding cut), the step counts and the schedule must be the saved ones."""
    out = setup
    p = subprocess.run([sys.executable, "-c", RESHARD, str(out / "config.yaml"), str(out / "whole"),
                        str(out / "resharded.pt")], env=single_process_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(out / "resharded.pt", weights_only=True)
    folder = out / "whole" / "checkpoints" / "step6"
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


def test_resume_on_one_rank_continues_exactly_the_weights(setup, launch):
    import shutil

    out = setup
    run_dir = out / "one-rank"
    shutil.copytree(out / "whole" / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "latest").write_text("step6")
    log = launch(out / "config.yaml", f"train.out_dir={run_dir}", "--resume", "latest", ranks=1)
    assert "resuming 2 rank(s) x 1 loader worker(s) as 1 x 1" in log and "steps 6..8" in log
    assert "resumed from step6" in log  # the weights loaded equal the saved export, bit for bit
    state = json.loads((run_dir / "checkpoints" / "step8" / "run_state.json").read_text())
    assert state["world_size"] == 1 and state["step"] == STEPS
    end, six = final_weights(run_dir), load_file(str(out / "whole" / "checkpoints" / "step6" / "model.safetensors"))
    assert any(not torch.equal(end[k], six[k]) for k in end)
