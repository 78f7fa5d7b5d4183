"""Heads: contrastive projections and temperature, ITM, box and MLM heads.

Outputs that feed a loss are returned in float32, also when DeepSpeed has cast the module to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projection(nn.Module):
    """Linear to the shared embedding space, then L2 normalisation (float32)."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)


class Temperature(nn.Module):
    """Learnable contrastive temperature, clamped to [lo, hi] when read."""

    def __init__(self, init: float, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        # Shape [1], not a scalar: DeepSpeed broadcasts parameters through flat views, which 0-d tensors refuse.
        self.temp = nn.Parameter(torch.tensor([init]))

    def forward(self) -> torch.Tensor:
        return self.temp.float().clamp(self.lo, self.hi).reshape(())


class MLPHead(nn.Sequential):
    """Linear(d, 2d), LayerNorm, GELU, Linear(2d, out): the ITM head (out 2) and the box head's body (out 4)."""

    def __init__(self, width: int, out: int):
        super().__init__(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out))


class BoxHead(MLPHead):
    """Normalised (cx, cy, w, h) in [0, 1] through a sigmoid."""

    def __init__(self, width: int):
        super().__init__(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).float().sigmoid()


class MLMHead(nn.Module):
    """BERT's prediction head: dense, GELU, LayerNorm, decoder to the vocabulary."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))
