"""Exported models: a folder with `model.safetensors` + `config.yaml` + `tokenizer/`, written beside every
training checkpoint. Writing, finding, hashing and loading them, and building a model from one, with no training
code and no code from the files (safetensors and YAML only).

    model, tokenizer, cfg = load_pretrained("runs/base")     # a run folder, a checkpoint folder or an export
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import torch
import yaml

from x2vlm.config import RunConfig, from_dict, save_config

WEIGHTS = "model.safetensors"
log = logging.getLogger("x2vlm")


def export_weights(state: dict, cfg: RunConfig, folder: Path, tokenizer_dir: str | None) -> None:
    """Write an export: the weights (safetensors), the run configuration and a copy of the tokenizer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS))
    save_config(cfg, folder / "config.yaml")
    if tokenizer_dir and Path(tokenizer_dir).is_dir() and not (folder / "tokenizer").exists():
        shutil.copytree(tokenizer_dir, folder / "tokenizer")


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
    """sha256 of the weights file of an export (folder, run folder or checkpoints folder)."""
    digest = hashlib.sha256()
    with open(find_export(path) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(model: torch.nn.Module, path: str | Path, allow_missing: bool = True) -> None:
    """Weights of an export into `model` (weights only, no code from the file). Parameters the file lacks keep
    their fresh initialisation when `allow_missing` (e.g. parts a later stage adds); a tensor the model does not
    have, or of another shape, is an error."""
    from safetensors.torch import load_file

    file = find_export(path) / WEIGHTS
    missing, unexpected = model.load_state_dict(load_file(str(file)), strict=False)
    if unexpected or (missing and not allow_missing):
        raise RuntimeError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing:
        log.info(f"{len(missing)} tensors not in {file} keep their fresh initialisation: {missing[:5]}")


def read_config(folder: str | Path) -> RunConfig:
    """The run configuration saved in an export."""
    return from_dict(yaml.safe_load((find_export(folder) / "config.yaml").read_text()))


def load_tokenizer_of(folder: str | Path, cfg: RunConfig):
    """The tokenizer saved in an export, else the one its configuration names."""
    from x2vlm.data.tokenizer import load_tokenizer

    tok_dir = find_export(folder) / "tokenizer"
    return load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.model.text.tokenizer)


def build_model(cfg: RunConfig, tokenizer):
    """A freshly initialised model for a configuration and its tokenizer."""
    from x2vlm.model import X2VLM

    return X2VLM(cfg.model, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, cfg) from an export, a checkpoint folder or a run folder."""
    folder = find_export(path)
    cfg = read_config(folder)
    tokenizer = load_tokenizer_of(folder, cfg)
    model = build_model(cfg, tokenizer)
    load_weights(model, folder, allow_missing=False)
    return model.to(device).eval(), tokenizer, cfg
