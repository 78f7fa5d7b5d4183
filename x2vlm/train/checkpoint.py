"""Checkpoints. DeepSpeed's own (model, optimiser, scheduler, step) for resuming, and beside each one a
self-contained export for everything else: `model.safetensors` + `config.yaml` + the tokenizer, which loads with
no code from the file and no renaming."""
from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from x2vlm.config import RunConfig, from_dict, save_config, to_dict
from x2vlm.train import distributed as dist_util

WEIGHTS = "model.safetensors"


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


def save(engine, cfg: RunConfig, step: int, extra: dict | None = None) -> Path:
    """DeepSpeed checkpoint `step{N}` (all ranks take part) with the run config in its client state, plus the
    weights export in the same folder (rank 0)."""
    root = checkpoint_dir(cfg)
    tag = f"step{step}"
    state = {"step": step, "config": to_dict(cfg), **(extra or {})}
    engine.save_checkpoint(str(root), tag=tag, client_state=state)
    weights = full_state_dict(engine)
    if weights is not None:
        export_weights(weights, cfg, root / tag, cfg.model.text.tokenizer)
    dist_util.barrier()
    return root / tag


def resume(engine, cfg: RunConfig, which: str) -> int:
    """Load `latest` or a named tag into the engine; returns the step to continue from."""
    root = checkpoint_dir(cfg)
    if which == "latest":
        if not (root / "latest").exists():
            raise FileNotFoundError(f"--resume latest: no checkpoint under {root}")
        which = (root / "latest").read_text().strip()
    if not (root / which).is_dir():
        raise FileNotFoundError(f"--resume {which}: no checkpoint {root / which}")
    path, state = engine.load_checkpoint(str(root), tag=which)
    if path is None:
        raise FileNotFoundError(f"--resume {which}: nothing loaded from {root / which}")
    verify_loaded(engine, root / which)
    return int(state["step"])


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


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """(model, tokenizer, cfg) from an exported checkpoint folder; loads weights only, never code."""
    from safetensors.torch import load_file

    import yaml

    from x2vlm.data.tokenizer import load_tokenizer
    from x2vlm.model import X2VLM

    folder = find_export(path)
    cfg = from_dict(yaml.safe_load((folder / "config.yaml").read_text()), check_paths=False)
    tok_dir = folder / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.model.text.tokenizer)
    model = X2VLM(cfg.model, cfg.loss, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)
    missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{folder / WEIGHTS} does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), tokenizer, cfg
