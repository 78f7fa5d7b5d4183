"""Ranks and recall from score matrices. Queries are rows; `gt[q]` is the index of query q's true item."""
from __future__ import annotations

import torch


def model_device(model) -> torch.device:
    """Where a model's parameters are: evaluation inputs go there (the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def gt_ranks(scores: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's true item: how many items score strictly higher (ties count in its favour)."""
    true = scores.gather(1, gt[:, None])
    return (scores > true).sum(1)


def recall(ranks: torch.Tensor, ks=(1, 5, 10)) -> dict:
    out = {f"r{k}": float((ranks < k).float().mean()) for k in ks}
    out["median_rank"] = float(ranks.float().median()) + 1
    out["mean_rank"] = float(ranks.float().mean()) + 1
    return out


def top_pairs(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, items) [Q, k]: each row's top-k items by `scores`."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top), top


def place_first(scores: torch.Tensor, rows: torch.Tensor, top: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`scores` with the items `top` [Q, k] of each row given the scores `new` [Q, k]: they come first in the new
    order (by the new score), the rest keep their order behind them."""
    out = scores.float() - scores.float().max() + new.float().min() - 1.0  # the rest stays below every new score
    out[rows, top] = new.float()
    return out
