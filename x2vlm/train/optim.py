"""AdamW with X2-VLM's parameter groups and a linear warm-up / linear decay schedule.

With the optimiser offloaded to the CPU (ZeRO-Offload) the AdamW is DeepSpeed's CPU Adam (a compiled op, built
on first use), which DeepSpeed requires there; otherwise torch's AdamW."""
from __future__ import annotations

import torch

from x2vlm.config import TrainConfig


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norms (1-d tensors), embeddings' position/type tables and the temperature get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or "temp" in name.split(".")[-1]


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Four groups: {loaded, fresh} x {decay, no decay}. Fresh parameters learn `new_param_lr_scale` faster."""
    is_new = getattr(model, "is_new_param", lambda name: False)
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups.setdefault((bool(is_new(name)), no_decay(name, p)), []).append(p)
    out = []
    for (new, nd), params in sorted(groups.items()):
        scale = cfg.new_param_lr_scale if new else 1.0
        out.append({"params": params, "weight_decay": 0.0 if nd else cfg.weight_decay,
                    "lr": cfg.lr * scale, "lr_scale": scale, "name": f"{'new' if new else 'loaded'}"
                    f"{'_nodecay' if nd else ''}"})
    return out


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, offload: bool = False):
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                               adamw_mode=True)
    else:
        opt = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps))
    return opt, sched
