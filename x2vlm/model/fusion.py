"""Fusion encoder: text tokens attend to each other, then through cross-attention to the vision tokens.

Each layer: self-attention, cross-attention (keys/values projected from the vision width to the text width),
feed-forward. The layers are pre-LN (normalise, transform, add) with a final LayerNorm. Why not BERT's post-LN:
these layers start from random weights (they are not copied from BERT here) and learn at twice the base rate;
pre-LN keeps the residual stream an identity path at initialisation, so gradients reach the text and vision
encoders undiminished and training is stable without depending on a long warm-up. The final LayerNorm gives the
heads normalised features as post-LN would.

Attention is torch's scaled_dot_product_attention with boolean masks, True = may be attended to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import FusionConfig


class Attention(nn.Module):
    """Multi-head attention of queries x [M, L, D] over keys/values kv [M, V, Dkv] with a key mask [M, V]."""

    def __init__(self, width: int, kv_width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_width, width)
        self.v = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        m, n, d = x.shape
        return x.view(m, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(self.q(x)), self.split_heads(self.k(kv)), self.split_heads(self.v(kv))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)
        m, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(m, n, h * d))


class FusionLayer(nn.Module):
    def __init__(self, width: int, vision_width: int, cfg: FusionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.self_attn = Attention(width, width, cfg.heads, cfg.dropout)
        self.norm2 = nn.LayerNorm(width)
        self.cross_attn = Attention(width, vision_width, cfg.heads, cfg.dropout)
        self.norm3 = nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, cfg.intermediate_size), nn.GELU(),
                                 nn.Linear(cfg.intermediate_size, width))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, text_mask, vis, vis_mask):
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, text_mask))
        x = x + self.drop(self.cross_attn(self.norm2(x), vis, vis_mask))
        return x + self.drop(self.ffn(self.norm3(x)))


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, width: int, vision_width: int):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(width, vision_width, cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, text_atts: torch.Tensor, vis: torch.Tensor,
                vis_mask: torch.Tensor) -> torch.Tensor:
        """text [M, L, Dt], text_atts [M, L] (1 = token, 0 = padding), vis [M, V, Dv], vis_mask [M, V] bool
        -> [M, L, Dt]."""
        text_mask = text_atts.bool()
        for layer in self.layers:
            text = layer(text, text_mask, vis, vis_mask)
        return self.norm(text)
