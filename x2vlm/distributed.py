"""Every collective of the project, and the process group's set-up.

Works under the deepspeed launcher, torchrun, or as one plain process (a world of one, where every collective is
the identity). Each collective hands its tensors to the process group on the group's communication device (NCCL:
the current CUDA device; gloo: the CPU) and gives results back on the device the caller's tensor was on, so that
callers never need to know which backend runs underneath. Nothing else in the project calls torch.distributed's
collectives (a test checks).
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


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


def init() -> None:
    """Initialise torch.distributed through DeepSpeed (NCCL on GPUs, gloo on CPUs) and pick this rank's GPU."""
    import deepspeed

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
        import torch.distributed.nn.functional as dist_autograd

        parts = dist_autograd.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    offset = sum(sizes[:rank()])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(x.device), offset
