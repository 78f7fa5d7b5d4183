"""The distributed module on its own: which device a collective's tensors go to per backend, collectives in a world
of one, and the stale build lock that would make every launch wait forever."""
import os
import time

import pytest
import torch

from x2vlm import distributed


def test_communication_device_per_backend(monkeypatch):
    assert distributed.comm_device("gloo") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.comm_device("nccl") == torch.device("cuda", 3)
    assert distributed.comm_device("NCCL") == torch.device("cuda", 3)


def test_collectives_in_a_faked_world_of_two(monkeypatch):
    """Rank 1 of two, with torch.distributed's collectives faked: every tensor handed to them is on the
    communication device and contiguous, the caller's tensor is left alone, results are right."""
    import torch.distributed as dist

    seen = []

    def fake_all_reduce(t, op=None):
        seen.append(("all_reduce", t.device, t.is_contiguous()))
        t.mul_(2)  # the other rank holds the same values

    def fake_all_gather(parts, t):
        seen.append(("all_gather", t.device, t.is_contiguous()))
        for p in parts:
            p.copy_(t)

    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "comm_device", lambda backend=None: torch.device("cpu"))
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "all_gather", fake_all_gather)
    x = torch.tensor([1.0, 2.0], dtype=torch.float64)
    y = distributed.all_reduce(x)
    assert torch.equal(y, torch.tensor([2.0, 4.0], dtype=torch.float64)) and torch.equal(x, torch.tensor([1.0, 2.0],
                                                                                                    dtype=torch.float64))
    assert distributed.all_true(True) and seen[-1][0] == "all_reduce"
    rows, offset = distributed.all_gather_rows(torch.arange(12.0).view(6, 2)[::2])  # a non-contiguous view
    assert offset == 3 and rows.shape == (6, 2)  # each "rank" had 3 rows; this is rank 1
    assert all(device == torch.device("cpu") and contiguous for _, device, contiguous in seen)


def test_a_world_of_one_needs_no_process_group():
    x = torch.randn(3, 2)
    assert torch.equal(distributed.all_reduce(x, "max"), x) and distributed.all_true(True)
    assert not distributed.all_true(False)
    rows, offset = distributed.all_gather_rows(x, with_grad=True)
    assert rows is x and offset == 0


def test_a_stale_build_lock_is_found_and_named(tmp_path, monkeypatch):
    old = time.time() - 600
    stale = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    stale.parent.mkdir(parents=True)
    stale.write_text("")
    os.utime(stale, (old, old))
    fresh = tmp_path / "other_op" / "lock"  # TORCH_EXTENSIONS_DIR layout: ROOT/op/lock
    fresh.parent.mkdir()
    fresh.write_text("")
    assert distributed.stale_build_locks(tmp_path) == [stale]
    with open(stale):  # a process that holds the lock open is compiling: the lock is not stale
        assert distributed.stale_build_locks(tmp_path) == []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    with pytest.raises(distributed.StaleBuildLock, match=f"rm {stale}"):
        distributed.check_build_locks()
    stale.unlink()
    distributed.check_build_locks()


def test_a_build_lock_released_while_it_is_looked_at_is_not_an_error(tmp_path, monkeypatch):
    """Every rank looks for stale locks at start while another rank may be loading DeepSpeed's ops under its lock:
    a lock listed and then released is nobody's problem (it once stopped a launch with 'No such file')."""
    gone = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    listed = type(tmp_path).glob
    monkeypatch.setattr(type(tmp_path), "glob", lambda self, pattern: [gone] if pattern == "*/*/lock" else
                        list(listed(self, pattern)))
    assert distributed.stale_build_locks(tmp_path) == []


def test_shared_memory_that_no_process_maps_is_released(tmp_path):
    import mmap

    old = time.time() - 600
    paths = [tmp_path / f"deepspeed_allreduce_buffer_0_127.0.0.1_1234_{r}" for r in range(3)]
    for p in paths:
        p.write_bytes(bytes(4096))
    for p in paths[:2]:
        os.utime(p, (old, old))
    with open(paths[0], "r+b") as f, mmap.mmap(f.fileno(), 4096) as mapped:  # a live rank maps its buffer
        gone = distributed.release_shm_buffers(pattern=str(tmp_path / "deepspeed_allreduce_buffer_*"))
        assert mapped[:1] == b"\x00"
    assert gone == [paths[1]] and paths[0].exists() and not paths[1].exists()
    assert paths[2].exists()  # young: perhaps a rank that is just starting
