"""Masked language modelling: cross-entropy at masked positions only, in float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [..., V], labels [...] with -100 where nothing is predicted: the mean cross-entropy over the
    labelled positions. With none labelled it is 0, still connected to the graph (every parameter gets a
    gradient, as DeepSpeed ZeRO expects)."""
    logits, labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, labels, ignore_index=IGNORE)
