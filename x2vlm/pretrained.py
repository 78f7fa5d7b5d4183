"""Exported models: a folder with `model.safetensors` + `config.yaml` + `tokenizer/` (+ `answers.json` for a
question-answering model), written beside every training checkpoint and by `x2vlm import-official`. Writing,
finding, hashing and loading them, and building a model from one, with no training code and no code from the
files (safetensors, YAML and JSON only).

    model, tokenizer, cfg = load_pretrained("runs/base")     # a run folder, a checkpoint folder or an export
    model, tokenizer, cfg = load_pretrained("runs/base", image_size=384, frames=8)    # at another size

An export stands alone: its configuration names no backbone initialisation file (the weights are in the export;
a text encoder that came from a local folder is described by that folder's architecture instead), the tokenizer
is inside, and so is the answer vocabulary of a QA model, so the folder loads after it is moved anywhere.
Weights load into a model of another resolution or frame count: position tables are interpolated and frame
embeddings resized (x2vlm.model.resize), and one line says what was resized.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from pathlib import Path

import torch
import yaml

from x2vlm.config import RunConfig, from_dict, read_answer_vocab, save_config, update

WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer"
ANSWERS = "answers.json"  # {answer: label} of a QA model's head
ANSWER_VOCAB = "ans2label.json"  # what `make-shards --format video-qa` writes beside the shards
# Architecture settings of a transformers text encoder that its configuration file may set apart from what
# x2vlm.model.text.text_config derives; an export keeps them, so the encoder builds the same without the file.
TEXT_ARCHITECTURE = ("max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act",
                     "position_embedding_type", "pad_token_id")
log = logging.getLogger("x2vlm")


def text_architecture(text_cfg) -> dict:
    """Dotted configuration values that describe the text encoder in `text_cfg.init_checkpoint` (a local
    transformers folder) without the folder."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(text_cfg.init_checkpoint, local_files_only=True)
    extra = {k: getattr(hf, k) for k in TEXT_ARCHITECTURE if getattr(hf, k, None) is not None}
    return {"model.text.model_type": hf.model_type, "model.text.hidden_size": hf.hidden_size,
            "model.text.layers": hf.num_hidden_layers, "model.text.heads": hf.num_attention_heads,
            "model.text.intermediate_size": hf.intermediate_size, "model.text.vocab_size": hf.vocab_size,
            "model.text.extra": {**extra, **text_cfg.extra}}


def portable_config(cfg: RunConfig) -> RunConfig:
    """The configuration an export is saved with: no backbone initialisation files (the weights hold them), the
    text architecture spelled out when it came from a folder, and no path to the answer vocabulary (the export
    carries it as answers.json)."""
    values = {"model.vision.init_checkpoint": "", "model.text.init_checkpoint": "", "model.qa_vocab": ""}
    if cfg.model.text.init_checkpoint:
        values.update(text_architecture(cfg.model.text))
    return update(cfg, values)


def export_weights(state: dict, cfg: RunConfig, folder: Path, tokenizer_dir: str | None) -> None:
    """Write an export: the weights (safetensors), the portable run configuration, the tokenizer (a copy of the
    folder, or the files of a hub tokenizer) and, when `cfg.model.qa_vocab` names one, the answer vocabulary."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / WEIGHTS))
    save_config(portable_config(cfg), folder / "config.yaml")
    if tokenizer_dir and not (folder / TOKENIZER).exists():
        if Path(tokenizer_dir).is_dir():
            shutil.copytree(tokenizer_dir, folder / TOKENIZER)
        else:
            from x2vlm.data.tokenizer import load_tokenizer

            load_tokenizer(tokenizer_dir).save_pretrained(str(folder / TOKENIZER))
    if cfg.model.qa_vocab:
        read_answer_vocab(cfg.model.qa_vocab, cfg.model.qa_answers)  # checked before it travels
        shutil.copyfile(cfg.model.qa_vocab, folder / ANSWERS)


def answer_vocab_beside(shards) -> str | None:
    """The answer vocabulary that `make-shards --format video-qa` wrote beside a set of QA shards, if any."""
    from x2vlm.data.shards import expand_shards

    for path in expand_shards(shards):
        candidate = Path(path).parent / ANSWER_VOCAB
        if candidate.is_file():
            return str(candidate)
    return None


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


def _side(rows: int) -> str:
    from x2vlm.model.resize import rel_pos_grid

    side = rel_pos_grid(rows)
    return f"{side}x{side}"


def fit_state(state: dict, model: torch.nn.Module) -> tuple[dict, list[str]]:
    """`state` with its position tables and frame embedding resized to what `model` has (its resolution and
    frame count), and one note per kind of tensor resized. Other tensors are left as they are."""
    from x2vlm.model.resize import resize_abs_pos, resize_frames, resize_rel_pos_table

    own = model.state_dict()
    grid = getattr(model, "grid", None)
    out, notes = dict(state), {}
    for key, value in state.items():
        target = own.get(key)
        if target is None or target.shape == value.shape:
            continue
        if key.endswith("relative_position_bias_table") and value.dim() == 2 and value.shape[1] == target.shape[1]:
            out[key] = resize_rel_pos_table(value, target.shape[0])
            what = f"relative position bias tables {_side(value.shape[0])} -> {_side(target.shape[0])} offsets"
        elif key in ("vision.vit.pos_embed", "fusion.vis_pos") and grid and value.dim() == 3:
            prefix = target.shape[1] - grid * grid
            old = math.isqrt(value.shape[1] - prefix)
            out[key] = resize_abs_pos(value, grid, prefix)
            what = f"{key} {old}x{old} -> {grid}x{grid} patches"
        elif key == "temporal.frame_embed" and value.dim() == 4:
            out[key] = resize_frames(value, target.shape[1])
            what = f"frame embedding {value.shape[1]} -> {target.shape[1]} frames"
        else:
            continue
        notes[what] = notes.get(what, 0) + 1
    return out, [f"{n} {what}" if n > 1 else what for what, n in notes.items()]


def load_weights(model: torch.nn.Module, path: str | Path, allow_missing: bool = True) -> list[str]:
    """Weights of an export into `model` (weights only, no code from the file), resized to the model's
    resolution and frame count where they differ (one line says what was resized; the notes are returned).
    Parameters the file lacks keep their fresh initialisation when `allow_missing` (e.g. parts a later stage
    adds); a tensor the model does not have, or of another shape, is an error."""
    from safetensors.torch import load_file

    file = find_export(path) / WEIGHTS
    state, notes = fit_state(load_file(str(file)), model)
    if notes:
        log.info(f"resized the weights of {file.parent} to the model's resolution and frame count: "
                 f"{'; '.join(notes)}")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape that no resizing explains
        raise RuntimeError(f"{file} does not fit the model: {str(e).splitlines()[-1].strip()}") from None
    if unexpected or (missing and not allow_missing):
        raise RuntimeError(f"{file} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if missing:
        log.info(f"{len(missing)} tensors not in {file} keep their fresh initialisation: {missing[:5]}")
    return notes


def read_config(folder: str | Path) -> RunConfig:
    """The run configuration saved in an export."""
    return from_dict(yaml.safe_load((find_export(folder) / "config.yaml").read_text()))


def read_answers(folder: str | Path) -> list[str] | None:
    """The answers of a QA export in label order (answers.json), or None when it has none."""
    file = find_export(folder) / ANSWERS
    if not file.is_file():
        return None
    vocab = json.loads(file.read_text())
    return sorted(vocab, key=vocab.get)


def load_tokenizer_of(folder: str | Path, cfg: RunConfig):
    """The tokenizer saved in an export, else the one its configuration names."""
    from x2vlm.data.tokenizer import load_tokenizer

    tok_dir = find_export(folder) / TOKENIZER
    return load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.model.text.tokenizer)


def resized_config(cfg: RunConfig, image_size: int | None = None, frames: int | None = None) -> RunConfig:
    """`cfg` for another resolution and/or frame count (video sources read at most that many frames)."""
    values: dict = {}
    if image_size:
        values["model.vision.image_size"] = image_size
    if frames:
        values["model.video.max_frames"] = frames
        for i, s in enumerate(cfg.data.sources):
            if s.kind in ("video", "video_qa") and s.max_frames > frames:
                values[f"data.sources.{i}.max_frames"] = frames
                values[f"data.sources.{i}.min_frames"] = min(s.min_frames, frames)
    return update(cfg, values) if values else cfg


def build_model(cfg: RunConfig, tokenizer):
    """A freshly initialised model for a configuration and its tokenizer."""
    from x2vlm.model import X2VLM

    return X2VLM(cfg.model, vocab_size=len(tokenizer), pad_id=tokenizer.pad_token_id)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", image_size: int | None = None,
                    frames: int | None = None):
    """(model in eval mode, tokenizer, cfg) from an export, a checkpoint folder or a run folder; at another
    resolution (`image_size`) or frame count (`frames`) than it was saved with when given."""
    folder = find_export(path)
    cfg = resized_config(read_config(folder), image_size, frames)
    tokenizer = load_tokenizer_of(folder, cfg)
    model = build_model(cfg, tokenizer)
    load_weights(model, folder, allow_missing=False)
    return model.to(device).eval(), tokenizer, cfg
