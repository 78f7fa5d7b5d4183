"""Typed run configuration: dataclasses loaded from YAML presets with dotted command-line overrides.

    cfg = load_config("tiny", overrides=["model.fusion.layers=2", "train.steps=100"])

A preset is a name of a YAML file in `x2vlm/presets/` or a path to a YAML file. Any unknown key, wrongly typed
value or impossible value raises ConfigError with one line that names the dotted key and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the dotted key."""


@dataclass
class VisionConfig:
    name: str = "vit_base_patch16_224"  # any timm model name (ViT / BEiT / BEiT-2 families)
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    drop_path: float = 0.1
    init_checkpoint: str = ""  # local weights file (.safetensors or .pt); nothing is downloaded
    frozen: bool = False  # keep the loaded weights, compute no gradient for them (fine-tuning on little data)
    extra: dict = field(default_factory=dict)  # further keyword arguments for timm.create_model


@dataclass
class TextConfig:
    model_type: str = "bert"  # any transformers model type with an encoder (bert, xlm-roberta, ...)
    tokenizer: str = ""  # local tokenizer directory or hub id; "" = train a WordPiece tokenizer on the data
    init_checkpoint: str = ""  # local directory with weights for from_pretrained; "" = random init
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_len: int = 40
    vocab_size: int = 0  # 0 = take it from the tokenizer
    dropout: float = 0.1
    extra: dict = field(default_factory=dict)  # further keyword arguments for the transformers config


@dataclass
class FusionConfig:
    layers: int = 6
    heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    vision_positions: bool = True  # add a patch-position table to the vision tokens that cross-attention reads


@dataclass
class VideoConfig:
    aggregator: str = "mean"  # mean (the original X2-VLM: blind to frame order) | attention (temporal transformer)
    max_frames: int = 8  # frame embedding table size: the most frames a clip may have
    layers: int = 1  # attention aggregator: temporal transformer layers
    heads: int = 4


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    embed_dim: int = 256
    box_pool_impl: str = "auto"  # auto | reference | cpu | triton (x2vlm.ops.box_pool)
    qa_answers: int = 0  # video QA: size of the answer vocabulary (a classifier on the fusion [CLS]); 0 = none
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5


@dataclass
class LossConfig:
    mlm_prob: float = 0.5
    max_masks: int = 12
    span_prob: float = 0.2  # chance that a masked word grows into a 2-3 token span
    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    bbox: float = 1.0
    giou: float = 1.0
    itc_impl: str = "auto"  # auto | reference | chunked | triton (x2vlm.ops.contrastive_loss)


@dataclass
class SourceConfig:
    name: str = "images"
    kind: str = "image"  # image | region | video | video_qa
    shards: list = field(default_factory=list)  # tar paths or globs
    batch_size: int = 8  # images (or clips) per rank and step
    weight: float = 1.0  # loss weight of this source in every step
    max_texts: int = 5  # region sources: texts per image (whole-image caption + regions)
    with_caption: bool = True  # region sources: the whole-image caption is one of the image's texts
    fps: float = 1.0  # video sources: frames sampled per second of video
    max_frames: int = 8  # video sources: longer clips are subsampled uniformly
    min_frames: int = 1  # video sources: shorter clips repeat frames


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)  # of SourceConfig; every step takes one batch from each
    num_workers: int = 1
    crop_scale_min: float = 0.5
    hflip: bool = True
    max_skip_fraction: float = 0.1  # stop the run when more than this fraction of samples was bad


@dataclass
class StageConfig:
    name: str = "stage1"
    steps: int = 100
    sources: list = field(default_factory=list)  # names of data.sources used in every step of this stage
    lr: float = 0.0  # 0 = train.lr


@dataclass
class TrainConfig:
    out_dir: str = "runs/x2vlm"
    steps: int = 1000
    lr: float = 1e-4
    new_param_lr_scale: float = 2.0  # freshly initialised parameters learn this much faster
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    ds_config: str = "zero2_bf16.json"  # a file name in ds_configs/ or a path
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto = bf16 where the hardware supports it
    seed: int = 42
    save_every: int = 500
    keep_last: int = 0  # keep only the newest N checkpoints (0 = all)
    max_bad_steps: int = 5  # steps with a non-finite loss or gradient are skipped; this many in a row stop the run
    sample_log: bool = False  # each rank writes the keys of the samples of every step to OUT/samples/rankN.jsonl
    log_every: int = 10
    wandb_project: str = "x2vlm"
    wandb_mode: str = "offline"  # offline | online | disabled
    # Stages run one after the other; each later stage starts from the previous stage's final weights with a
    # fresh optimizer and schedule. Empty: one stage of train.steps steps over all sources.
    stages: list = field(default_factory=list)  # of StageConfig; train.steps must equal the sum of their steps


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "data.sources.kind": ("image", "region", "video", "video_qa"),
    "model.video.aggregator": ("mean", "attention"),
    "model.box_pool_impl": ("auto", "reference", "cpu", "triton"),
    "loss.itc_impl": ("auto", "reference", "chunked", "triton"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.wandb_mode": ("offline", "online", "disabled"),
}
POSITIVE = {
    "model.vision.image_size", "model.vision.patch_size", "model.vision.width", "model.vision.depth",
    "model.vision.heads", "model.text.hidden_size", "model.text.layers", "model.text.heads",
    "model.text.intermediate_size", "model.text.max_len", "model.fusion.layers", "model.fusion.heads",
    "model.fusion.intermediate_size", "model.embed_dim", "model.temp", "data.sources.batch_size",
    "data.sources.max_texts", "data.sources.fps", "data.sources.max_frames", "data.sources.min_frames",
    "model.video.max_frames", "model.video.layers", "model.video.heads", "train.stages.steps", "train.steps",
    "train.lr", "train.grad_accum", "train.save_every", "train.log_every", "train.max_bad_steps",
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str) -> Any:
    """Check `value` against the field type `tp`; ints are accepted where floats are expected."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        return value
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        value = raw[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, value, key)
        elif key in LISTS:
            if not isinstance(value, list):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            kwargs[f.name] = [_build(LISTS[key], v, key) for v in value]
        else:
            kwargs[f.name] = _coerce(value, tp, key)
    return cls(**kwargs)


LISTS = {"data.sources": SourceConfig, "train.stages": StageConfig}  # lists of sections


def _walk(obj, prefix=""):
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, key)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                yield from _walk(item, key)
        else:
            yield key, value


def validate(cfg: RunConfig, check_paths: bool = True) -> RunConfig:
    """Value checks that types alone cannot express. Raises ConfigError naming the key."""
    for key, value in _walk(cfg):
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"{key}: expected one of {', '.join(CHOICES[key])}, got {value!r}")
        if key in POSITIVE and not value > 0:
            raise ConfigError(f"{key}: expected a positive number, got {value!r}")
    v = cfg.model.vision
    if v.image_size % v.patch_size:
        raise ConfigError(f"model.vision.image_size: expected a multiple of patch_size {v.patch_size}, "
                          f"got {v.image_size}")
    if v.width % v.heads:
        raise ConfigError(f"model.vision.width: expected a multiple of heads {v.heads}, got {v.width}")
    if cfg.model.text.hidden_size % cfg.model.fusion.heads:
        raise ConfigError(f"model.fusion.heads: expected a divisor of model.text.hidden_size "
                          f"{cfg.model.text.hidden_size}, got {cfg.model.fusion.heads}")
    if not 0 < cfg.loss.mlm_prob < 1:
        raise ConfigError(f"loss.mlm_prob: expected a number between 0 and 1, got {cfg.loss.mlm_prob}")
    if len(cfg.train.betas) != 2:
        raise ConfigError(f"train.betas: expected two numbers, got {cfg.train.betas!r}")
    names = [s.name for s in cfg.data.sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"data.sources.name: expected unique names, got {names}")
    for s in cfg.data.sources:
        if s.kind == "video" and s.max_frames > cfg.model.video.max_frames:
            raise ConfigError(f"data.sources.max_frames: source {s.name!r} takes up to {s.max_frames} frames, more "
                              f"than model.video.max_frames {cfg.model.video.max_frames}")
        if s.min_frames > s.max_frames:
            raise ConfigError(f"data.sources.min_frames: source {s.name!r}: expected at most max_frames "
                              f"{s.max_frames}, got {s.min_frames}")
    stages = cfg.train.stages
    if stages:
        if len({st.name for st in stages}) != len(stages):
            raise ConfigError(f"train.stages.name: expected unique names, got {[st.name for st in stages]}")
        for st in stages:
            unknown = [n for n in st.sources if n not in names]
            if not st.sources or unknown:
                raise ConfigError(f"train.stages.sources: stage {st.name!r} must name sources among {names}, "
                                  f"got {st.sources}")
        total = sum(st.steps for st in stages)
        if cfg.train.steps != total:
            raise ConfigError(f"train.steps: expected the sum of the stages' steps ({total}), got {cfg.train.steps}")
    if check_paths:
        for path_key, path in (("model.vision.init_checkpoint", v.init_checkpoint),
                               ("model.text.init_checkpoint", cfg.model.text.init_checkpoint)):
            if path and not os.path.exists(path):
                raise ConfigError(f"{path_key}: file not found: {path}")
        from x2vlm.data.shards import expand_shards  # late import: the data package imports this module

        for s in cfg.data.sources:
            if not s.shards:
                raise ConfigError(f"data.sources.shards: source {s.name!r} names no shards")
            try:
                expand_shards(s.shards)
            except FileNotFoundError as e:
                raise ConfigError(f"data.sources.shards: source {s.name!r}: {e}") from None
    return cfg


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:i + 1])}: expected a list index below {len(node)}")
            node = node[int(p)]
            continue
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{key}: expected a list index below {len(node)}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a section")


def preset_path(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.exists():
            raise ConfigError(f"config: file not found: {name}")
        return p
    p = PRESET_DIR / f"{name}.yaml"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"config: unknown preset {name!r} (expected one of: {known}, or a .yaml path)")
    return p


def load_raw(preset: str, overrides: list[str] | None = None) -> dict:
    with open(preset_path(preset)) as f:
        raw = yaml.safe_load(f) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), _parse_value(text.strip()))
    return raw


def from_dict(raw: dict, check_paths: bool = True) -> RunConfig:
    return validate(_build(RunConfig, raw, ""), check_paths=check_paths)


def load_config(preset: str, overrides: list[str] | None = None, check_paths: bool = True) -> RunConfig:
    return from_dict(load_raw(preset, overrides), check_paths=check_paths)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
