"""Every collective of the project, and the process group's set-up.

Works under the deepspeed launcher, torchrun, or as one plain process (a world of one, where every collective is
the identity). Each collective hands its tensors to the process group on the group's communication device (NCCL:
the current CUDA device; gloo: the CPU) and gives results back on the device the caller's tensor was on, so that
callers never need to know which backend runs underneath. Nothing else in the project calls torch.distributed's
collectives (a test checks).
"""
from __future__ import annotations

import atexit
import contextlib
import glob
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

STALE_LOCK_AFTER_S = 60  # a build lock that no process holds open and this old is left from a killed build


class StaleBuildLock(RuntimeError):
    """A lock file left by an interrupted compilation of a DeepSpeed op: every later launch would wait forever."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_single_process_env() -> None:
    """A plain `python -m x2vlm pretrain` is a world of one: give it the variables a launcher would set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _held_open() -> set:
    """Paths of the files that some process holds open (Linux /proc; empty where it cannot be read)."""
    held = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                held.add(os.readlink(fd))
        except OSError:  # a process that ended, or one we may not look into
            continue
    return held


def _age(path: Path) -> float:
    """Seconds since the file last changed; 0 for one that is gone (another rank's build released its lock
    between our listing and our look: the race every rank of a launch runs at start)."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def stale_build_locks(root: str | os.PathLike | None = None, older_than_s: float = STALE_LOCK_AFTER_S) -> list:
    """Lock files under torch's extension build folder (where DeepSpeed compiles its ops on first use) that no
    live process holds open and that are older than `older_than_s`: left by a process killed while compiling.
    The builder holds its lock open for as long as it compiles, so a lock nobody holds is nobody's."""
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    found = [*Path(root).glob("*/lock"), *Path(root).glob("*/*/lock")]  # ROOT/op/lock or ROOT/pyXY_cpu/op/lock
    locks = [p for p in found if _age(p) > older_than_s]
    if not locks or not Path("/proc/self/fd").is_dir():
        return []
    held = _held_open()
    return [p for p in locks if str(p.resolve()) not in held and p.exists()]  # (released meanwhile: not stale)


def check_build_locks() -> None:
    """StaleBuildLock naming the file to delete when a stale build lock would make this launch wait forever."""
    stale = stale_build_locks()
    if stale:
        paths = " ".join(str(p) for p in stale)
        raise StaleBuildLock(f"an interrupted compilation left {paths} behind (no process holds it); every launch "
                             f"would wait for it forever. Delete it: rm {paths}")


SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"  # DeepSpeed's CPU all-reduce buffers, one per rank


def _mapped() -> set:
    """Paths of the files that some live process has mapped into memory (Linux /proc)."""
    found = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            found.update(fields[5].strip() for line in maps.read_text().splitlines()
                         if len(fields := line.split(maxsplit=5)) == 6)
        except OSError:
            continue
    return found


def release_shm_buffers(older_than_s: float = STALE_LOCK_AFTER_S, pattern: str = SHM_BUFFERS) -> list:
    """Delete DeepSpeed's shared-memory all-reduce buffers (about 70 MB of RAM each) that no live process maps:
    the CPU communication op creates one per rank and launch and never removes it, so every launch, and every
    killed one, would leave its buffers in /dev/shm until the machine runs out of memory. Returns the paths."""
    if not Path("/proc/self/maps").exists():
        return []
    candidates = []
    for p in map(Path, glob.glob(pattern)):
        try:
            st = p.stat()
        except OSError:  # gone meanwhile
            continue
        # only this user's: another user's live buffers cannot be told apart here (their /proc maps are private)
        if st.st_uid == os.getuid() and time.time() - st.st_mtime > older_than_s:
            candidates.append(p)
    if not candidates:
        return []
    mapped = _mapped()
    gone = []
    for p in candidates:
        if str(p) not in mapped:
            try:
                p.unlink(missing_ok=True)
            except OSError:
                continue
            gone.append(p)
    return gone


def _release_own_shm_buffers() -> None:
    """At exit: this rank's buffers of this launch (the files go once every rank that maps them has exited)."""
    env = os.environ
    tail = f"_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{env.get('RANK', '0')}"
    for p in glob.glob(SHM_BUFFERS):
        if p.endswith(tail):
            Path(p).unlink(missing_ok=True)


def init() -> None:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs) and pick this rank's GPU.
    Refuses to start (StaleBuildLock) when a killed compilation left a build lock behind; removes the shared
    memory that earlier launches' ranks left behind, and this rank's when it exits."""
    import deepspeed

    check_build_locks()
    release_shm_buffers()
    atexit.register(_release_own_shm_buffers)
    fill_single_process_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main() -> bool:
    return rank() == 0


def env_rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group, else of the launcher's RANK / WORLD_SIZE variables, else (0, 1):
    what a data reader made before the group exists should assume."""
    if initialized():
        return rank(), world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def comm_device(backend: str | None = None) -> torch.device:
    """The device a collective's tensors must be on: the current CUDA device for NCCL, the CPU otherwise."""
    backend = backend if backend is not None else (dist.get_backend() if initialized() else "gloo")
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_comm(t: torch.Tensor) -> torch.Tensor:
    return t.to(comm_device()).contiguous()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX"}


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A new tensor: `t` reduced over ranks ("sum", "min" or "max"), on t's device; `t` is left as it is."""
    if world_size() == 1:
        return t.clone()
    buf = _to_comm(t.detach().clone())
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, _OPS[op]))
    return buf.to(t.device)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank."""
    return bool(all_reduce(torch.tensor([float(flag)]), "min").item())


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward gives each rank the gradient of its own part, summed over all ranks' uses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x)
        return torch.stack(parts)  # [world, n, ...]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank()]


@contextlib.contextmanager
def full_parameters(module: torch.nn.Module):
    """The module's full parameters on every rank within the block (ZeRO-3 partitions them: they are gathered;
    otherwise nothing happens). Every rank must enter it."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def all_gather_rows(x: torch.Tensor, with_grad: bool = False) -> tuple[torch.Tensor, int]:
    """x [n_r, ...] concatenated over ranks in rank order, where n_r may differ between ranks; returns (all rows,
    index of this rank's first row). Sizes are gathered first; each rank pads to the largest, gathers, and the
    padding is cut. With `with_grad` the gather is differentiable: its backward sends each rank the gradient of
    its own rows (summed over the ranks that used them)."""
    world = world_size()
    if world == 1:
        return x, 0
    dev = comm_device()
    n = torch.tensor([x.shape[0]], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]).to(dev).contiguous()
    if with_grad:
        parts = _GatherWithGrad.apply(padded)  # [world, max n, ...]
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    offset = sum(sizes[:rank()])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device), offset
