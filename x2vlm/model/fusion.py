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
from torch.utils.checkpoint import checkpoint

from x2vlm.config import FusionConfig


class Attention(nn.Module):
    """Multi-head attention of queries x [M, L, D] over keys/values with a key mask [M, V].

    Keys/values come from `kv` [N, V, Dkv]. For self-attention N = M. For cross-attention `kv` holds each image
    once and `index` [M] names each query row's image, so the key/value projections of an image are computed
    once however many texts attend to it; `first` [M, Dkv] optionally replaces token 0 per text (the region
    token of a box)."""

    def __init__(self, width: int, kv_width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(kv_width, width)
        self.v = nn.Linear(kv_width, width)
        self.out = nn.Linear(width, width)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        m, n, d = x.shape
        return x.view(m, n, self.heads, d // self.heads).transpose(1, 2)  # [M, H, N, D / H]

    def keys_values(self, kv: torch.Tensor, index: torch.Tensor | None, first: torch.Tensor | None):
        k, v = self.k(kv), self.v(kv)  # [N, V, D]: once per image
        if first is None:
            return (k, v) if index is None else (k[index], v[index])
        rest = slice(1, None)
        k, v = (k[:, rest], v[:, rest]) if index is None else (k[index, rest], v[index, rest])
        return torch.cat([self.k(first)[:, None], k], 1), torch.cat([self.v(first)[:, None], v], 1)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor, index: torch.Tensor | None = None,
                first: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.keys_values(kv, index, first)  # [M, V, D] each
        q, k, v = self.split_heads(self.q(x)), self.split_heads(k), self.split_heads(v)  # [M, H, L | V, D / H]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=kv_mask[:, None, None, :],
                                           dropout_p=self.dropout if self.training else 0.0)  # [M, H, L, D / H]
        m, h, n, d = y.shape
        return self.out(y.transpose(1, 2).reshape(m, n, h * d))  # [M, L, D]


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

    def forward(self, x, text_mask, vis, vis_mask, index=None, first=None):
        h = self.norm1(x)
        x = x + self.drop(self.self_attn(h, h, text_mask))
        x = x + self.drop(self.cross_attn(self.norm2(x), vis, vis_mask, index, first))
        return x + self.drop(self.ffn(self.norm3(x)))


def run_layers(layers, text: torch.Tensor, checkpointing: bool, *args) -> torch.Tensor:
    """text through each layer(text, *args) in turn; with `checkpointing` (while training) each layer keeps only
    its inputs for backward and runs again there."""
    for layer in layers:
        if checkpointing and layer.training and torch.is_grad_enabled():
            text = checkpoint(layer, text, *args, use_reentrant=False)
        else:
            text = layer(text, *args)
    return text


class FusionEncoder(nn.Module):
    def __init__(self, cfg: FusionConfig, width: int, vision_width: int, grid: int):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(width, vision_width, cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(width)
        self.checkpointing = False  # activation checkpointing of every layer (see ModelConfig)
        # Where each patch is, added to the vision tokens that keys and values are computed from (token 0, the
        # image or region token, gets row 0). The ViT's own position embedding enters only at its input and
        # fades with depth; box regression reads positions through cross-attention and learns far sooner with
        # them at hand. Starts as a 2-D sine-cosine table, learnable.
        self.vis_pos = None
        if cfg.vision_positions:
            from x2vlm.model.vision import sincos_2d

            table = torch.cat([torch.zeros(1, vision_width), sincos_2d(grid, vision_width)])
            self.vis_pos = nn.Parameter(table[None])

    def forward(self, text: torch.Tensor, text_atts: torch.Tensor, vis: torch.Tensor, vis_mask: torch.Tensor,
                index: torch.Tensor | None = None, first: torch.Tensor | None = None) -> torch.Tensor:
        """text [M, L, Dt], text_atts [M, L] (1 = token, 0 = padding), vis [N, V, Dv] with index [M] (text ->
        row of vis; None: N = M, row i for text i), vis_mask [M, V] bool, first [M, Dv] or None (replaces
        vision token 0 per text) -> [M, L, Dt]."""
        text_mask = text_atts.bool()  # [M, L]
        if self.vis_pos is not None:
            pos = self.vis_pos.to(vis.dtype)  # [1, 1 + P, Dv]
            vis = vis + pos
            first = None if first is None else first + pos[0, :1]
        text = run_layers(self.layers, text, self.checkpointing, text_mask, vis, vis_mask, index, first)
        return self.norm(text)
