"""Videos as images: every frame goes through the image encoder (all frames of a batch as one batch), a learnable
frame embedding is added, and a temporal aggregator turns the F frames into one image-shaped token sequence, so
that region handling, fusion and heads are shared with images.

Two aggregators (`model.video.aggregator`):

- `mean`: the original X2-VLM. The mean over time of (frame tokens + frame embedding) equals the mean of the
  frame tokens plus a constant, so it does not depend on the order of the frames: a clip and the same clip played
  backwards give the same tokens, and the direction of a motion cannot be told.
- `attention`: a small temporal transformer. At every token position (the mean token and each patch) the F
  frame tokens, with their frame embeddings, attend to each other over time (pre-LN self-attention + MLP,
  `model.video.layers` layers); the outputs are then averaged over time. Order enters through the frame
  embeddings inside the attention, so "red at the left early, at the right late" and its reverse differ. Its
  output projections start at zero, so it starts as `mean` and learns what order adds.

Padding frames (clips with fewer frames than the batch's longest) are masked out of the attention and the mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from x2vlm.config import VideoConfig


class TemporalBlock(nn.Module):
    """Pre-LN self-attention over time + MLP for x [S, F, D] (S sequences of F frames) with a frame mask [S, F]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        for out in (self.proj, self.mlp[2]):  # start as the identity: `attention` begins as `mean`
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s, f, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(s, f, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(s, f, d))
        return x + self.mlp(self.norm2(x))


class TemporalAggregator(nn.Module):
    def __init__(self, cfg: VideoConfig, width: int):
        super().__init__()
        self.kind = cfg.aggregator
        self.frame_embed = nn.Parameter(torch.zeros(1, cfg.max_frames, 1, width))
        nn.init.normal_(self.frame_embed, std=0.02)
        layers = cfg.layers if cfg.aggregator == "attention" else 0
        self.blocks = nn.ModuleList(TemporalBlock(width, cfg.heads) for _ in range(layers))

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames [B, F, T, D] (T tokens per frame), frame_mask [B, F] bool (True = a real frame) -> [B, T, D]."""
        b, f, t, d = frames.shape
        if f > self.frame_embed.shape[1]:
            raise ValueError(f"{f} frames per clip, but model.video.max_frames is {self.frame_embed.shape[1]}")
        x = frames + self.frame_embed[:, :f].to(frames.dtype)
        if self.blocks:
            x = x.permute(0, 2, 1, 3).reshape(b * t, f, d)  # one sequence over time per token position
            m = frame_mask.repeat_interleave(t, 0)
            for block in self.blocks:
                x = block(x, m)
            x = x.view(b, t, f, d).permute(0, 2, 1, 3)
        w = frame_mask.to(x.dtype)[:, :, None, None]
        return (x * w).sum(1) / w.sum(1).clamp(min=1)
