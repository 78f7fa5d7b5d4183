"""Typed run configuration: dataclasses loaded from YAML presets with dotted command-line overrides.

    cfg = load_config("tiny", overrides=["model.fusion.layers=2", "train.steps=100"])

A preset is the name of a YAML file in `x2vlm/presets/` or a path to a YAML file. Every constraint sits beside its
field: the types (`Literal` choices, element types of lists) are checked when a configuration is built, and each
section's `__post_init__` checks its values. A wrong key or value raises ConfigError with one line that names the
dotted key and what was expected. A configuration changed in code is checked again with `validate(cfg)`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the dotted key."""


def positive(section, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if not value > 0:
            raise ConfigError(f"{name}: expected a positive number, got {value!r}")


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
    # tokens: the ViT's final LayerNorm on every token; patches: a LayerNorm on the patch tokens only, as BEiT-2's
    # mean-pooling head and X2-VLM (timm's `fc_norm.*`): the same patch tokens, under other parameter names.
    final_norm: Literal["tokens", "patches"] = "tokens"
    # Pixel statistics the encoder works in. Images always arrive normalised with mean = std = 0.5 (the data
    # pipeline's); the encoder maps them to these first. clip: X2-VLM's (CLIP's mean and std); imagenet.
    pixels: Literal["half", "clip", "imagenet"] = "half"
    # How pixels become patch tokens. patch: the ViT's own linear patch embedding (every published checkpoint).
    # conv: a small convolutional stem in its place (x2vlm.model.vision.ConvStem), for encoders trained from
    # scratch: they learn shapes many times faster (docs/experiments.md).
    stem: Literal["patch", "conv"] = "patch"
    extra: dict = field(default_factory=dict)  # further keyword arguments for timm.create_model

    def __post_init__(self):
        positive(self, "image_size", "patch_size", "width", "depth", "heads")
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size: expected a multiple of patch_size {self.patch_size}, got "
                              f"{self.image_size}")
        if self.width % self.heads:
            raise ConfigError(f"width: expected a multiple of heads {self.heads}, got {self.width}")
        if self.stem == "conv":
            if self.patch_size < 2 or self.patch_size & (self.patch_size - 1):
                raise ConfigError(f"stem: conv needs a patch_size that is a power of two, got {self.patch_size}")


@dataclass
class TextConfig:
    model_type: str = "bert"  # any transformers model type with an encoder (bert, xlm-roberta, ...)
    tokenizer: str = ""  # local tokenizer directory or hub id
    init_checkpoint: str = ""  # local directory with weights for from_pretrained; "" = random init
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    max_len: int = 40
    vocab_size: int = 0  # 0 = take it from the tokenizer
    dropout: float = 0.1
    extra: dict = field(default_factory=dict)  # further keyword arguments for the transformers config

    def __post_init__(self):
        positive(self, "hidden_size", "layers", "heads", "intermediate_size", "max_len")


@dataclass
class FusionConfig:
    layers: int = 6
    heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    vision_positions: bool = True  # add a patch-position table to the vision tokens that cross-attention reads
    # prenorm: the project's fusion layers (pre-LN, final LayerNorm); bert: X2-VLM's post-LN BERT layers with
    # cross-attention, named as Hugging Face BERT (x2vlm.model.fusion_bert)
    style: Literal["prenorm", "bert"] = "prenorm"

    def __post_init__(self):
        positive(self, "layers", "heads", "intermediate_size")
        if self.style == "bert" and self.vision_positions:
            raise ConfigError("vision_positions: the bert fusion style has no vision position table; set it false")


@dataclass
class VideoConfig:
    aggregator: Literal["mean", "attention"] = "mean"  # mean: the original X2-VLM, blind to frame order
    max_frames: int = 8  # frame embedding table size: the most frames a clip may have
    layers: int = 1  # attention aggregator: temporal transformer layers
    heads: int = 4

    def __post_init__(self):
        positive(self, "max_frames", "layers", "heads")


BoxPoolImpl = Literal["auto", "reference", "cpu", "triton"]  # x2vlm.ops.box_pool
Tower = Literal["vision", "text", "fusion"]
ItcImpl = Literal["auto", "reference", "chunked", "triton"]  # x2vlm.ops.contrastive_loss


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    embed_dim: int = 256
    box_pool_impl: BoxPoolImpl = "auto"
    qa_answers: int = 0  # video QA: size of the answer vocabulary (a classifier on the fusion [CLS]); 0 = none
    qa_vocab: str = ""  # video QA: the answer vocabulary ({answer: label} JSON), copied into every export
    temp: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    # Towers whose layers keep only their inputs for backward and compute the rest again there: less activation
    # memory for about one more forward pass of those towers.
    activation_checkpointing: list[Tower] = field(default_factory=list)

    def __post_init__(self):
        positive(self, "embed_dim", "temp")
        if self.text.hidden_size % self.fusion.heads:
            raise ConfigError(f"fusion.heads: expected a divisor of text.hidden_size {self.text.hidden_size}, "
                              f"got {self.fusion.heads}")


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
    itc_impl: ItcImpl = "auto"

    def __post_init__(self):
        if not 0 < self.mlm_prob < 1:
            raise ConfigError(f"mlm_prob: expected a number between 0 and 1, got {self.mlm_prob}")


SourceKind = Literal["image", "region", "video", "video_qa"]


@dataclass
class SourceConfig:
    name: str = "images"
    kind: SourceKind = "image"
    shards: list[str] = field(default_factory=list)  # tar paths, globs, brace patterns, folders, pipe:/http shards
    batch_size: int = 8  # images (or clips) per rank and step
    weight: float = 1.0  # loss weight of this source in every step
    max_texts: int = 5  # region sources: texts per image (whole-image caption + regions); video_qa: questions per clip
    with_caption: bool = True  # region sources: the whole-image caption is one of the image's texts
    fps: float = 1.0  # video sources: frames sampled per second of video
    max_frames: int = 8  # video sources: longer clips are subsampled uniformly
    min_frames: int = 1  # video sources: shorter clips repeat frames
    seek: Literal["exact", "keyframe"] = "exact"  # video sources: keyframe = the nearest keyframe, when one is near
    keyframe_tolerance: float = 0.5  # seconds: how near a keyframe must be to a sample time (seek: keyframe)

    def __post_init__(self):
        positive(self, "batch_size", "max_texts", "fps", "max_frames", "min_frames")
        if self.keyframe_tolerance < 0:
            raise ConfigError(f"keyframe_tolerance: expected a number >= 0, got {self.keyframe_tolerance}")
        if self.min_frames > self.max_frames:
            raise ConfigError(f"min_frames: source {self.name!r}: expected at most max_frames {self.max_frames}, "
                              f"got {self.min_frames}")


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # every step takes one batch from each
    num_workers: int = 1
    crop_scale_min: float = 0.5
    hflip: bool = True
    max_skip_fraction: float = 0.1  # stop the run when more than this fraction of samples was bad
    open_shards: int = 4  # shards each loader worker reads at once, drawing every sample from one of them at random
    remote_cache: str = ""  # local folder for remote shards (pipe:, http): downloaded once, read by index; "" = stream

    def __post_init__(self):
        positive(self, "open_shards")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"sources.name: expected unique names, got {names}")


@dataclass
class StageConfig:
    name: str = "stage1"
    steps: int = 100
    sources: list[str] = field(default_factory=list)  # names of data.sources used in every step of this stage
    lr: float = 0.0  # 0 = train.lr

    def __post_init__(self):
        positive(self, "steps")


@dataclass
class EvalConfig:
    """Held-out evaluation during training (train.eval_every): whichever of these shard sets are given, each
    evaluated as `x2vlm evaluate` does on its first `limit` images or clips, on the main rank."""
    images: list[str] = field(default_factory=list)  # image-text shards: retrieval both ways, ITC and ITM re-rank
    regions: list[str] = field(default_factory=list)  # region shards: grounding (images with min_regions or more)
    videos: list[str] = field(default_factory=list)  # video-text shards: video retrieval and the direction probe
    videoqa: list[str] = field(default_factory=list)  # video QA shards (needs model.qa_answers)
    limit: int = 200  # images (grounding: images; videos and QA: clips) of each evaluation, in shard order
    rerank_k: int = 16
    min_regions: int = 2
    fps: float = 1.0
    max_frames: int = 8
    examples: int = 8  # pictures and table rows kept per evaluation (grounding images, retrieval queries, answers)

    def __post_init__(self):
        positive(self, "limit", "rerank_k", "min_regions", "fps", "max_frames")
        if self.examples < 0:
            raise ConfigError(f"examples: expected a number >= 0, got {self.examples}")

    def shard_sets(self) -> dict:
        """{task: shard patterns} of the evaluations given."""
        return {k: v for k, v in (("images", self.images), ("regions", self.regions), ("videos", self.videos),
                                  ("videoqa", self.videoqa)) if v}


Precision = Literal["auto", "bf16", "fp16", "fp32"]  # auto = the DeepSpeed file's, where the hardware runs it


@dataclass
class TrainConfig:
    out_dir: str = "runs/x2vlm"
    steps: int = 1000
    lr: float = 1e-4
    new_param_lr_scale: float = 2.0  # freshly initialised parameters learn this much faster
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    ds_config: str = "zero2_bf16.json"  # a file name in ds_configs/ or a path
    precision: Precision = "auto"
    seed: int = 42
    save_every: int = 500
    keep_last: int = 0  # keep only the newest N checkpoints (0 = all)
    max_bad_steps: int = 5  # steps with a non-finite loss or gradient are skipped; this many in a row stop the run
    sample_log: bool = False  # each rank writes the keys of the samples of every step to OUT/samples/rankN.jsonl
    log_every: int = 10
    eval_every: int = 0  # held-out evaluation every N steps (and before the first and after the last); 0 = never
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb_project: str = "x2vlm"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    # Stages run one after the other; each later stage starts from the previous stage's final weights with a
    # fresh optimizer and schedule. Empty: one stage of train.steps steps over all sources.
    stages: list[StageConfig] = field(default_factory=list)  # train.steps must equal the sum of their steps

    def __post_init__(self):
        positive(self, "steps", "lr", "grad_accum", "save_every", "log_every", "max_bad_steps")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every: expected a number >= 0, got {self.eval_every}")
        if len(self.betas) != 2:
            raise ConfigError(f"betas: expected two numbers, got {self.betas!r}")
        names = [st.name for st in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages.name: expected unique names, got {names}")
        total = sum(st.steps for st in self.stages)
        if self.stages and self.steps != total:
            raise ConfigError(f"steps: expected the sum of the stages' steps ({total}), got {self.steps}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        names = [s.name for s in self.data.sources]
        for i, st in enumerate(self.train.stages):
            unknown = [n for n in st.sources if n not in names]
            if not st.sources or unknown:
                raise ConfigError(f"train.stages.{i}.sources: stage {st.name!r} must name sources among {names}, "
                                  f"got {st.sources}")
        held = self.train.eval
        if self.train.eval_every and held.videoqa and not self.model.qa_answers:
            raise ConfigError("train.eval.videoqa: video QA evaluation needs an answer head (model.qa_answers)")
        if self.train.eval_every and (held.videos or held.videoqa) and held.max_frames > self.model.video.max_frames:
            raise ConfigError(f"train.eval.max_frames: {held.max_frames} frames per clip, more than "
                              f"model.video.max_frames {self.model.video.max_frames}")
        for i, s in enumerate(self.data.sources):
            if s.kind in ("video", "video_qa") and s.max_frames > self.model.video.max_frames:
                raise ConfigError(f"data.sources.{i}.max_frames: source {s.name!r} takes up to {s.max_frames} "
                                  f"frames, more than model.video.max_frames {self.model.video.max_frames}")


# Lists of patterns that users type as they would in a shell (braces, globs, commas, with or without brackets).
PATTERN_FIELDS = {(SourceConfig, "shards"),
                  *((EvalConfig, name) for name in ("images", "regions", "videos", "videoqa"))}


# --- building from plain data -------------------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def split_patterns(text: str) -> list[str]:
    """A shard list as users type it: "a.tar", "a.tar,b.tar", "[a.tar, b.tar]", "[shards/coco-{000..099}.tar]"
    -> its patterns. Commas inside braces belong to a brace pattern ("{a,b}.tar"); quotes around an item go."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    items, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth <= 0:
            items.append(current)
            current = ""
        else:
            current += ch
    items.append(current)
    out = []
    for item in (i.strip() for i in items):
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "'\"":
            item = item[1:-1].strip()
        if item:
            out.append(item)
    return out


def _coerce(value: Any, tp, key: str, patterns: bool = False) -> Any:
    """`value` checked against the field type `tp` (ints are accepted where floats are expected; a list of
    `patterns`, such as a source's shards, may be given as one string: see split_patterns)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if patterns and isinstance(value, str):
        value = split_patterns(value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}.{i}") for i, v in enumerate(value)]
        return value if item is Any else [_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value)]
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
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _field_type(section, name: str, key: str):
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        names = ", ".join(sorted(f.name for f in dataclasses.fields(section)))
        raise ConfigError(f"{key}: unknown key (expected one of: {names})")
    return hints[name]


def _construct(cls, kwargs: dict, prefix: str):
    """cls(**kwargs), with the section's own checks' errors named by their full dotted key."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None


def _build(cls, raw: Any, prefix: str):
    if isinstance(raw, cls):  # a section built in code: checked by validate()
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (expected one of: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(raw[name], hints[name], f"{prefix}.{name}" if prefix else name,
                            (cls, name) in PATTERN_FIELDS)
              for name in names if name in raw}
    return _construct(cls, kwargs, prefix)


def validate(cfg, prefix: str = ""):
    """Run every section's checks again (after a configuration was changed in code); returns `cfg`."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
            for i, v in enumerate(value):
                validate(v, f"{key}.{i}")
        else:
            _coerce(value, hints[f.name], key)
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        try:
            post()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return cfg


def update(cfg, values: dict):
    """A checked copy of a configuration with dotted keys set to values given as objects (numbers, strings,
    lists, sections or plain dicts for sections), e.g. update(cfg, {"train.steps": 40, "data.sources":
    [SourceConfig(name="clips", kind="video", shards=paths)]})."""
    new = copy.deepcopy(cfg)
    for key, value in values.items():
        *path, last = key.split(".")
        node = new
        for i, part in enumerate(path):
            where = ".".join(path[:i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{where}: expected a list index below {len(node)}")
                node = node[int(part)]
            elif dataclasses.is_dataclass(node):
                _field_type(node, part, where)
                node = getattr(node, part)
            else:
                raise ConfigError(f"{where}: not a section")
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{key}: expected a list index below {len(node)}")
            old = node[int(last)]
            node[int(last)] = _build(type(old), value, key) if dataclasses.is_dataclass(old) else value
        else:
            setattr(node, last, _coerce(value, _field_type(node, last, key), key, (type(node), last) in PATTERN_FIELDS))
    return validate(new)


def check_paths(cfg: RunConfig) -> RunConfig:
    """The local files a run starts from must exist (shards are checked by the data layer)."""
    for key, path in (("model.vision.init_checkpoint", cfg.model.vision.init_checkpoint),
                      ("model.text.init_checkpoint", cfg.model.text.init_checkpoint)):
        if path and not os.path.exists(path):
            raise ConfigError(f"{key}: file not found: {path}")
    if cfg.model.qa_vocab:
        read_answer_vocab(cfg.model.qa_vocab, cfg.model.qa_answers)
    return cfg


def read_answer_vocab(path: str | os.PathLike, size: int) -> list[str]:
    """The answers of a vocabulary file ({answer: label} JSON, labels 0..n-1) in label order; it must hold `size`
    answers (model.qa_answers)."""
    import json

    key = "model.qa_vocab"
    try:
        vocab = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: {path} is not JSON: {e}") from None
    if not isinstance(vocab, dict) or not all(type(v) is int for v in vocab.values()) \
            or sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{key}: {path}: expected {{answer: label}} with labels 0..n-1")
    if len(vocab) != size:
        raise ConfigError(f"{key}: {path} holds {len(vocab)} answers, but model.qa_answers is {size}")
    return sorted(vocab, key=vocab.get)


# --- YAML, presets and overrides -------------------------------------------------------------------------------

def _field_of(key: str):
    """(section class, field name) that a dotted key of a RunConfig names, or None."""
    tp, owner = RunConfig, None
    for part in key.split("."):
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return None
            tp, owner = hints[part], (tp, part)
        elif typing.get_origin(tp) is list and part.isdigit():
            tp, owner = typing.get_args(tp)[0], None
        else:
            return None
    return owner


def _parse_value(text: str, key: str = "") -> Any:
    """An override's value: YAML, except for a shard list, which is read as users type it (split_patterns)."""
    if text == "":
        return ""
    if _field_of(key) in PATTERN_FIELDS:
        return split_patterns(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = "; quote a pattern with braces, or set data.sources.N.shards on its own" if "{" in text else ""
        raise ConfigError(f"{key}: cannot read {text!r} as a value ({problem}{hint})") from None


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


def _apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"{item}: expected key=value (an override)")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"{item}: expected a dotted key before '=', e.g. train.steps=100")
        _set_dotted(raw, key, _parse_value(text.strip(), key))
    return raw


def load_raw(preset: str, overrides: list[str] | None = None) -> dict:
    path = preset_path(preset)
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config: {path}: not valid YAML ({problem}{where})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: {path}: cannot be read ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {path}: expected a mapping of sections (model, loss, data, train)")
    return _apply_overrides(raw, overrides)


def from_dict(raw: dict) -> RunConfig:
    return _build(RunConfig, raw, "")


def load_config(preset: str, overrides: list[str] | None = None) -> RunConfig:
    return from_dict(load_raw(preset, overrides))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
