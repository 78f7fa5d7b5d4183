"""Checkpoints. DeepSpeed's own (model, optimiser, scheduler, step) for resuming, and beside each one a
self-contained export for everything else: `model.safetensors` + `config.yaml` + the tokenizer, which loads with
no code from the file and no renaming."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from x2vlm.config import RunConfig, from_dict, save_config, to_dict
from x2vlm.train import distributed as dist_util

WEIGHTS = "model.safetensors"
PARTIAL = ".partial"  # suffix of a checkpoint folder being written
STATE = "run_state.json"  # step, stage, world size, and where the stage's starting weights came from
RANK_STATE = "rank{}.json"  # one per rank: its data positions, random generators and counters


def checkpoint_dir(cfg: RunConfig) -> Path:
    return Path(cfg.train.out_dir) / "checkpoints"


def full_state_dict(engine) -> dict | None:
    """fp32 copies of all weights on rank 0 (None elsewhere); gathers ZeRO-3 partitions when needed."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    stage3 = engine.zero_optimization_stage() == 3
    ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if stage3 else nullcontext()
    with ctx:
        if not dist_util.is_main():
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def export_weights(state: dict, cfg: RunConfig, folder: Path, tokenizer_dir: str | None) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS))
    save_config(cfg, folder / "config.yaml")
    if tokenizer_dir and Path(tokenizer_dir).is_dir() and not (folder / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, folder / "tokenizer")


def save(engine, cfg: RunConfig, step: int, extra: dict | None = None, rank_state: dict | None = None) -> Path:
    """DeepSpeed checkpoint `step{N}` (all ranks take part) with the run config in its client state, plus the
    weights export and the run state in the same folder (rank 0), and each rank's own state (`rank_state`: data
    positions, random generators, counters) in `rank{R}.json`.

    Atomic: everything is written under `step{N}.partial`; once every rank is done, rank 0 renames the folder to
    `step{N}` and only then points `latest` at it (a new file moved over the old one). A crash while saving
    leaves a `.partial` folder, which the next save removes, and `latest` on the previous checkpoint, which
    still loads. With train.keep_last = K > 0, checkpoints older than the newest K are deleted afterwards."""
    root = checkpoint_dir(cfg)
    tag = f"step{step}"
    partial = root / (tag + PARTIAL)
    if dist_util.is_main() and partial.exists():
        shutil.rmtree(partial)
    dist_util.barrier()
    state = {"step": step, "config": to_dict(cfg), **(extra or {})}
    engine.save_checkpoint(str(root), tag=partial.name, client_state=state, save_latest=False)
    if rank_state is not None:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / RANK_STATE.format(dist_util.rank())).write_text(json.dumps(rank_state))
    weights = full_state_dict(engine)
    if weights is not None:
        export_weights(weights, cfg, partial, cfg.model.text.tokenizer)
        (partial / STATE).write_text(json.dumps({k: v for k, v in state.items() if k != "config"}, indent=1))
    dist_util.barrier()
    if dist_util.is_main():
        final = root / tag
        if final.exists():  # the same step saved again (a resumed run that repeats a step)
            shutil.rmtree(final)
        os.replace(partial, final)
        write_latest(root, tag)
        prune(root, cfg.train.keep_last, keep=tag)
    dist_util.barrier()
    return root / tag


def write_latest(root: Path, tag: str) -> None:
    """Point `latest` at a complete checkpoint: write a new file, then move it over the old one (atomic)."""
    tmp = root / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / "latest")


def checkpoint_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, oldest first."""
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step(\d+)", p.name)) and p.is_dir())


def prune(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest `keep_last` checkpoints (0 = keep all); never the one named `keep`."""
    if keep_last <= 0:
        return
    for step in checkpoint_steps(root)[:-keep_last]:
        if f"step{step}" != keep:
            shutil.rmtree(root / f"step{step}")


def resolve_tag(cfg: RunConfig, which: str) -> str:
    """The checkpoint tag that `latest` (or a named tag) stands for; FileNotFoundError when there is none."""
    root = checkpoint_dir(cfg)
    if which == "latest":
        if not (root / "latest").exists():
            raise FileNotFoundError(f"--resume latest: no checkpoint under {root}")
        which = (root / "latest").read_text().strip()
    if not (root / which).is_dir():
        raise FileNotFoundError(f"--resume {which}: no checkpoint {root / which}")
    return which


def step_of(cfg: RunConfig, which: str) -> int:
    """The step a checkpoint (`latest` or a tag) was taken after, read from its run state."""
    tag = resolve_tag(cfg, which)
    state = read_state(checkpoint_dir(cfg) / tag)
    return int(state["step"])


def read_state(folder: Path) -> dict:
    """The run state (step, stage, config, ...) saved beside a checkpoint."""
    return json.loads((Path(folder) / STATE).read_text())


def read_rank_state(cfg: RunConfig, which: str, rank: int) -> dict | None:
    """One rank's saved state in a checkpoint (`latest` or a tag); None when the checkpoint has none for it."""
    path = checkpoint_dir(cfg) / resolve_tag(cfg, which) / RANK_STATE.format(rank)
    return json.loads(path.read_text()) if path.exists() else None


def next_epochs(cfg: RunConfig, which: str) -> dict:
    """{source: the epoch after the furthest one that any saved rank's loader worker had begun} of a checkpoint."""
    folder = checkpoint_dir(cfg) / resolve_tag(cfg, which)
    out: dict = {}
    for path in folder.glob(RANK_STATE.format("*")):
        for name, d in json.loads(path.read_text())["data"].items():
            for pos in d["workers"].values():
                out[name] = max(out.get(name, 0), pos["epoch"] + 1)
    return out


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's global generators (and CUDA's), as plain JSON data."""
    py = random.getstate()
    np_state = np.random.get_state()
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
           "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def safe_load(path, map_location=None):
    """torch.load of a DeepSpeed file with weights_only=True: tensors and plain data only, so no code from the
    file runs. DeepSpeed's own files hold three more plain-data classes, allowed by name."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def weights_only_engine(config=None):
    """DeepSpeed's torch checkpoint engine, loading every file with safe_load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location)

    return WeightsOnly(config)


def resume(engine, cfg: RunConfig, which: str) -> dict:
    """Load `latest` or a named tag into the engine (weights-only loading); returns its run state (step, stage,
    world_size, init_from, ...). A checkpoint of another number of ranks is re-sharded (load_resharded)."""
    root = checkpoint_dir(cfg)
    which = resolve_tag(cfg, which)
    state = read_state(root / which)
    if state.get("world_size", dist_util.world_size()) != dist_util.world_size():
        load_resharded(engine, root / which)
    else:
        if type(engine.checkpoint_engine).__name__ == "TorchCheckpointEngine":
            engine.checkpoint_engine = weights_only_engine(engine._config)
        path, _ = engine.load_checkpoint(str(root), tag=which)
        if path is None:
            raise FileNotFoundError(f"--resume {which}: nothing loaded from {root / which}")
    verify_loaded(engine, root / which)
    return state


def load_resharded(engine, folder: Path) -> None:
    """Continue a ZeRO-1/2 checkpoint written by another number of ranks: every old rank's slices of the fp32
    master weights and of the optimiser state (Adam's moments) are put together per parameter (DeepSpeed records
    where each parameter's slice lies in each rank's partition) and handed to the new engine, which keeps its own
    slice; the step counts, the schedule and the engine's counters come from the checkpoint too. Exact: weights,
    moments, steps and schedule. Each rank reads all old files (weights only)."""
    from collections import defaultdict

    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if engine.zero_optimization_stage() not in (1, 2):
        raise RuntimeError(f"{folder}: resuming on another number of ranks needs ZeRO stage 1 or 2 (this run uses "
                           f"stage {engine.zero_optimization_stage()}); resume on the saved number of ranks")
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


def verify_loaded(engine, folder: Path) -> None:
    """The weights now in the engine must equal the export written with the checkpoint, bit for bit."""
    from safetensors.torch import load_file

    current = full_state_dict(engine)
    if current is None:
        return
    if not (folder / WEIGHTS).exists():
        print(f"[x2vlm] resumed from {folder.name} (no {WEIGHTS} beside it to check the weights against)")
        return
    saved = load_file(str(folder / WEIGHTS))
    differ = [k for k, v in saved.items() if k not in current or not torch.equal(current[k], v)]
    if differ or set(current) != set(saved):
        raise RuntimeError(f"resumed weights differ from {folder / WEIGHTS}: {differ[:5]}")
    print(f"[x2vlm] resumed from {folder.name}: {len(saved)} tensors equal to the saved export", flush=True)


def find_export(path: str | Path) -> Path:
    """A folder with model.safetensors: the folder itself, a run folder (its latest checkpoint), or a
    checkpoints folder."""
    p = Path(path)
    if (p / WEIGHTS).exists():
        return p
    for root in (p / "checkpoints", p):
        latest = root / "latest"
        if latest.exists():
            q = root / latest.read_text().strip()
            if (q / WEIGHTS).exists():
                return q
    raise FileNotFoundError(f"no {WEIGHTS} in {p}, nor in a latest checkpoint under it")


def weights_sha256(path: str | Path) -> str:
    """sha256 of the weights file of an exported checkpoint (folder, run folder or checkpoints folder)."""
    digest = hashlib.sha256()
    with open(find_export(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, path: str | Path, allow_missing: bool = True) -> None:
    """Weights of an exported checkpoint into `model` (weights only, no code from the file). Parameters the file
    lacks keep their fresh initialisation when `allow_missing` (e.g. parts a later stage adds); a tensor the model
    does not have, or of another shape, is an error."""
    from safetensors.torch import load_file

    file = find_export(path) / WEIGHTS
    missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    if unexpected or (missing and not allow_missing):
        raise RuntimeError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing and dist_util.is_main():
        print(f"[x2vlm] {len(missing)} tensors not in {file} keep their fresh initialisation: {missing[:5]}")


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, cfg) from an exported checkpoint folder; loads weights only, never code."""

    import yaml

    from x2vlm.data.tokenizer import load_tokenizer
    from x2vlm.model import X2VLM

    folder = find_export(path)
    cfg = from_dict(yaml.safe_load((folder / "config.yaml").read_text()), check_paths=False)
    tok_dir = folder / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.model.text.tokenizer)
    model = X2VLM(cfg.model, cfg.loss, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)
    load_weights(model, folder, allow_missing=False)
    return model.to(device).eval(), tokenizer, cfg
