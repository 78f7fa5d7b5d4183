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


def rerank_scores(scores: torch.Tensor, k: int, rescore) -> torch.Tensor:
    """Re-score each row's top-k items with `rescore(query_idx [Q*k], item_idx [Q*k]) -> [Q*k]`; those k come
    first in the new order (by the new score), the rest keep their order behind them."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(top)
    new = rescore(rows.reshape(-1), top.reshape(-1)).reshape(top.shape).float()
    out = scores.float() - scores.float().max() + new.min() - 1.0  # the rest stays below every re-scored item
    out[rows, top] = new
    return out
