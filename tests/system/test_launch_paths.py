"""Launch paths on 2 CPU ranks: torchrun trains and resumes, with every collective recorded (each one x2vlm makes
goes through x2vlm/distributed.py, with its tensors on the device that module chose for the backend); ranks that
do not share the checkpoint folder refuse to start."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from x2vlm.config import SourceConfig, load_config, save_config, update
from x2vlm.demo.run import prepare_data
from x2vlm.distributed import free_port

RECORDER = textwrap.dedent("""
    # Runs `x2vlm ARGS` with torch.distributed's collectives wrapped: each call is recorded with the devices of the
    # tensors handed to it and the file that called it; each rank writes its records to RECORDS/rankR.json.
    import atexit, glob, json, os, sys
    import torch
    import torch.distributed as dist

    records, out = [], sys.argv[1]
    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "reduce",
             "reduce_scatter", "reduce_scatter_tensor", "barrier", "all_to_all_single", "broadcast_object_list")

    def tensors(x):
        if torch.is_tensor(x):
            return [x]
        if isinstance(x, (list, tuple)):
            return [t for y in x for t in tensors(y)]
        return []

    shm = set()  # DeepSpeed's shared-memory all-reduce buffers of this launch, seen while the rank ran

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            devices = sorted({str(t.device) for t in tensors(list(args) + list(kwargs.values()))})
            records.append({"name": name, "caller": caller, "devices": devices})
            result = fn(*args, **kwargs)
            shm.update(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"))
            return result
        return wrapped

    for name in NAMES:
        setattr(dist, name, wrap(name, getattr(dist, name)))

    def save():
        from x2vlm import distributed
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
            json.dump({"records": records, "comm_device": str(distributed.comm_device()), "shm": sorted(shm)}, f)

    atexit.register(save)
    from x2vlm.cli import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    paths = prepare_data(out, n_train=48, n_heldout=4, seed=9, image_size=64, shards_per_source=2)
    cfg = update(load_config("tiny"), {
        "train.stages": [], "data.sources": [
            SourceConfig(name="images", kind="image", shards=paths["train"], batch_size=4),
            SourceConfig(name="regions", kind="region", shards=paths["train"], batch_size=3)],
        "data.num_workers": 1, "model.text.tokenizer": str(out / "tokenizer"), "train.out_dir": str(out / "run"),
        "train.steps": 4, "train.save_every": 2, "train.log_every": 1, "train.precision": "fp32",
        "train.wandb_mode": "disabled", "train.warmup_steps": 2})
    save_config(cfg, out / "config.yaml")
    (out / "recorder.py").write_text(RECORDER)

    ports = []

    def torchrun(records: str, *args):
        ports.append(free_port())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(ports[-1]), str(out / "recorder.py"), str(out / records), *args]
        # DeepSpeed's CPU all-reduce uses shared-memory buffers only when LOCAL_SIZE (which its own launcher
        # sets) equals the number of ranks: set here so that their release is tested under torchrun too
        p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", LOCAL_SIZE="2"),
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    first = torchrun("first", "pretrain", "--config", str(out / "config.yaml"))
    resumed = torchrun("resumed", "pretrain", "--config", str(out / "config.yaml"), "--resume", "step2")
    return out, first, resumed, ports


def test_torchrun_trains_and_resumes(run):
    import glob

    out, first, resumed, ports = run
    assert "2 rank(s)" in first and "steps 0..4" in first
    assert "resumed from step2" in resumed and "steps 2..4" in resumed
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 3, 4]  # the resumed run logged its steps again
    for a, b in ((rows[2], rows[4]), (rows[3], rows[5])):  # exact resume: the same losses, term by term
        terms = lambda row: {k: v for k, v in row.items() if k.startswith(("images/", "regions/"))}  # noqa: E731
        assert terms(a) == terms(b) and len(terms(a)) >= 10
    # the ranks' shared-memory communication buffers, there while they ran, went with them
    seen = [json.loads((out / name / f"rank{r}.json").read_text())["shm"] for name in ("first", "resumed")
            for r in (0, 1)]
    assert all(seen), seen
    assert not [p for port in ports for p in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")]


def test_every_collective_of_x2vlm_goes_through_its_module_on_the_chosen_device(run):
    out, _, _, _ = run
    for records in ("first", "resumed"):
        for rank in (0, 1):
            data = json.loads((out / records / f"rank{rank}.json").read_text())
            ours = [r for r in data["records"] if f"{os.sep}x2vlm{os.sep}" in r["caller"]]
            assert ours, "x2vlm made no collective"
            assert {os.path.basename(r["caller"]) for r in ours} == {"distributed.py"}, ours[:3]
            assert all(r["devices"] in ([], [data["comm_device"]]) for r in ours), ours[:3]
            names = {r["name"] for r in ours}
            assert {"all_reduce", "all_gather", "barrier"} <= names, names
            assert "all_gather_object" not in names


def check_shared(rank: int, port: int, folders: list, results):
    import torch.distributed as dist

    from x2vlm.config import ConfigError
    from x2vlm.train.checkpoint import require_shared_dir

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        require_shared_dir(folders[rank])
        results[rank] = "ok"
    except ConfigError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


@pytest.mark.parametrize("shared", [True, False])
def test_ranks_that_do_not_share_the_checkpoint_folder_refuse_to_start(tmp_path, shared):
    import torch.multiprocessing as mp

    folders = [tmp_path / "ckpt", tmp_path / "ckpt"] if shared else [tmp_path / "node0", tmp_path / "node1"]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(check_shared, args=(free_port(), folders, results), nprocs=2, join=True)
        results = dict(results)
    if shared:
        assert results == {0: "ok", 1: "ok"} and not list((tmp_path / "ckpt").iterdir())  # the marker is gone
    else:
        assert all("do not share this folder" in r and "filesystem that every node sees" in r
                   for r in results.values()), results
