"""The DeepSpeed engine: a JSON file from ds_configs/ made to agree with the run configuration.

The shipped files live in the top-level `ds_configs/` folder, which the package reaches as `x2vlm/ds_configs`
(installed as package data, so they are found from a plain install too)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from x2vlm.config import ConfigError, RunConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"


def ds_config_path(name: str) -> Path:
    """A path as given, else a file of the shipped configs."""
    p = Path(name)
    if p.exists():
        return p
    q = DS_CONFIG_DIR / name
    if q.exists():
        return q
    if not DS_CONFIG_DIR.is_dir():
        raise ConfigError(f"train.ds_config: file not found: {name}, and the shipped configs are missing "
                          f"({DS_CONFIG_DIR}): reinstall x2vlm")
    known = ", ".join(sorted(x.name for x in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(f"train.ds_config: file not found: {name} (expected a path or one of: {known})")


def bf16_supported() -> bool:
    """bf16 that is fast on this hardware: a bf16-capable GPU, or a CPU with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(ds: dict, requested: str) -> str:
    """The precision a run uses. `auto` keeps the file's choice unless the hardware cannot run it well."""
    file_prec = "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") \
        else "fp32"
    prec = file_prec if requested == "auto" else requested
    if prec == "fp16" and not torch.cuda.is_available():
        if requested == "fp16":
            raise ConfigError("train.precision: fp16 needs a GPU (DeepSpeed refuses fp16 on CPU); use bf16 or fp32")
        prec = "fp32"
    if prec == "bf16" and requested == "auto" and not bf16_supported():
        prec = "fp32"
    return prec


def build_ds_config(cfg: RunConfig, world_size: int, sources: list | None = None) -> dict:
    """Load the JSON named by train.ds_config; fill its "auto" entries from the run configuration and refuse
    values that disagree with it. One micro-batch is one step's images over the sources (names; default all)
    of the stage, per rank."""
    path = ds_config_path(cfg.train.ds_config)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from None
    micro = sum(s.batch_size for s in cfg.data.sources if sources is None or s.name in sources) or 1
    wanted = {
        "train_micro_batch_size_per_gpu": (micro, "the sum of data.sources.batch_size"),
        "gradient_accumulation_steps": (cfg.train.grad_accum, "train.grad_accum"),
        "gradient_clipping": (cfg.train.grad_clip, "train.grad_clip"),
    }
    for key, (value, source) in wanted.items():
        have = ds.get(key, "auto")
        if have == "auto":
            ds[key] = value
        elif have != value:
            raise ConfigError(f"train.ds_config: {key} is {have} in {path.name} but {source} gives {value}; "
                              f"make them agree or set it to \"auto\" in the JSON")
    if "train_batch_size" in ds and ds["train_batch_size"] not in ("auto", micro * cfg.train.grad_accum * world_size):
        raise ConfigError(f"train.ds_config: train_batch_size {ds['train_batch_size']} in {path.name} disagrees "
                          f"with {micro} x grad_accum {cfg.train.grad_accum} x {world_size} ranks")
    ds.pop("train_batch_size", None)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"train.ds_config: remove \"{key}\" from {path.name}; the optimiser and schedule "
                              f"come from the train section of the run configuration")
    prec = resolve_precision(ds, cfg.train.precision)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": prec == "bf16"}
    if prec == "bf16":  # skip steps whose gradient is not finite (fp16 and fp32 do so already)
        ds["bf16"].setdefault("check_grad_overflow", True)
    ds["fp16"] = {**ds.get("fp16", {}), "enabled": prec == "fp16"}
    if prec in ("bf16", "fp16"):
        # Floating-point buffers in the weights' precision too: DeepSpeed otherwise keeps them in fp32, and timm's
        # BEiT concatenates its zero key-bias buffer with the query and value biases into one linear bias.
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", prec)
    ds["zero_allow_untested_optimizer"] = True
    return ds


def offloads_optimizer(ds: dict) -> bool:
    """Whether the DeepSpeed config puts the optimiser on the CPU."""
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def precision_of(ds: dict) -> str:
    return "bf16" if ds["bf16"]["enabled"] else "fp16" if ds["fp16"]["enabled"] else "fp32"


def build_engine(model, optimizer, scheduler, ds: dict):
    import deepspeed

    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                          lr_scheduler=scheduler, config=ds)
    return engine
