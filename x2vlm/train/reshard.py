"""Where x2vlm reaches into DeepSpeed's internals, and nowhere else: loading DeepSpeed's checkpoint files with
weights-only unpickling, and continuing a ZeRO-1/2 checkpoint on another number of ranks.

Re-sharding: every old rank's slices of the fp32 master weights and of the optimiser state (Adam's moments) are
put together per parameter (DeepSpeed records where each parameter's slice lies in each rank's partition) and
handed to the new engine, which keeps its own slice; the step counts, the schedule and the engine's counters come
from the checkpoint too. Exact: weights, moments, steps and schedule.
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from x2vlm.config import ConfigError


def safe_load(path, map_location=None):
    """torch.load of a DeepSpeed file with weights_only=True: tensors and plain data only, so no code from the
    file runs. DeepSpeed's own files hold three more plain-data classes, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_weights_only(engine) -> None:
    """Make the engine's checkpoint loading go through safe_load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine = WeightsOnly(engine._config)


def load_resharded(engine, folder: Path) -> None:
    """Continue a ZeRO-1/2 checkpoint written by another number of ranks (see the module docstring). Each rank
    reads all old files (weights only)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if engine.zero_optimization_stage() not in (1, 2):
        raise ConfigError(f"--resume {folder.name}: a ZeRO-{engine.zero_optimization_stage()} checkpoint resumes on "
                          f"the number of ranks that wrote it (only ZeRO-1/2 checkpoints are re-sharded); launch "
                          f"with that many ranks, or start from its weights with --init {folder}")
    files = sorted(folder.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)))
    if not files:
        raise FileNotFoundError(f"{folder}: no ZeRO optimiser files to re-shard")
    pieces: dict = defaultdict(lambda: defaultdict(list))
    steps: dict = {}
    for f in files:
        sd = safe_load(f, "cpu")["optimizer_state_dict"]
        for group, mapping in enumerate(sd["param_slice_mappings"]):
            state = sd["base_optimizer_state"]["state"].get(group, {})
            flat = {"fp32": sd["single_partition_of_fp32_groups"][group],
                    **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
            for name, frag in mapping.items():
                for key, t in flat.items():
                    pieces[name][key].append(t.narrow(0, frag.start, frag.numel))
            if "step" in state:
                steps[group] = state["step"]
    params = dict(engine.module.named_parameters())
    if set(pieces) != {n for n, p in params.items() if p.requires_grad}:
        raise RuntimeError(f"{folder}: the saved parameters do not match the model's")
    opt = engine.optimizer
    # A fresh optimiser has no state yet: make it (the saved step, zero moments), then link it to the parameters.
    keys = sorted({k for parts in pieces.values() for k in parts} - {"fp32"})
    for group, flat in enumerate(opt.single_partition_of_fp32_groups):
        if group in steps:
            opt.optimizer.state[flat] = {"step": steps[group].clone(), **{k: torch.zeros_like(flat) for k in keys}}
    opt._lazy_init_hp_params_optimizer_state()
    for name, parts in pieces.items():
        p = params[name]
        full = {k: torch.cat(v).view(p.shape) for k, v in parts.items()}
        with torch.no_grad():
            p.copy_(full.pop("fp32").to(p.dtype))
        safe_set_full_fp32_param(p, p.detach().float())
        for key, value in full.items():
            safe_set_full_optimizer_state(p, value, key)
    model_state = safe_load(folder / "mp_rank_00_model_states.pt", "cpu")
    if engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(model_state["lr_scheduler"])
    engine.global_steps, engine.global_samples = model_state["global_steps"], model_state["global_samples"]
    engine.skipped_steps = model_state["skipped_steps"]
