"""Videos as images: every frame goes through the image encoder (all frames of a batch as one batch), a learnable
frame embedding is added, and a temporal aggregator turns the F frames into one image-shaped token sequence, so
that region handling, fusion and heads are shared with images.

Two aggregators (`model.video.aggregator`):

- `mean`: the original X2-VLM. The mean over time of (frame tokens + frame embedding) equals the mean of the
  frame tokens plus a constant, so it does not depend on the order of the frames: a clip and the same clip played
  backwards give the same tokens, and the direction of a motion cannot be told.
- `attention`: order-aware, in two parts that both start at zero, so that it starts as `mean`:
  - a small temporal transformer. At every token position (the mean token and each patch) the F frame tokens,
    with their frame embeddings, attend to each other over time (pre-LN self-attention + MLP,
    `model.video.layers` layers); the outputs are then averaged over time. Its output projections start at zero.
  - a motion summary added to the clip token (token 0): for each channel, how far its centre of mass over the
    patch grid moves during the clip, i.e. the first spatial moments (x, y) of the channel's temporal trend (the
    least-squares slope over the real frames), layer-normalised and mapped to the token width by a linear map
    without bias that starts at zero and is scaled by `MOTION_GAIN`. Playing a clip backwards negates its motion
    summary; a still clip or a single frame has none.

  Why the motion summary: the frame-to-frame change is a small part of a frame token, and telling a direction
  from it takes a comparison across positions (where a shape was early against where it is late), which neither
  the temporal transformer nor the fusion encoder's cross-attention learns in a few hundred fine-tuning steps; a
  linear read-out of the motion moments does. Why on the clip token only: ITC reads it (whole-clip texts take
  token 0 as their region token) and the fusion encoder attends to it when a question asks about motion, while
  the patch tokens keep what each place shows. Added to every token, the same vector shifted every
  cross-attention output and crowded out colours and shapes (docs/experiments.md). `MOTION_GAIN` makes the
  zero-started read-out move that many times faster than the rest of the model.

Padding frames (clips with fewer frames than the batch's longest) are masked out of the attention, the mean and
the trend.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])  # [S, H, F, D / H]
        x = x + self.proj(y.transpose(1, 2).reshape(s, f, d))  # [S, F, D]
        return x + self.mlp(self.norm2(x))


def temporal_trend(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Least-squares slope over the real frames, per token and channel: frames [B, F, T, D], frame_mask [B, F]
    -> [B, T, D] (change per frame). Zero for a clip of one frame."""
    w = frame_mask.to(frames.dtype)[:, :, None, None]
    t = torch.arange(frames.shape[1], dtype=frames.dtype, device=frames.device)[None, :, None, None]
    centred = (t - (t * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp(min=1)) * w
    return (frames * centred).sum(1) / (centred ** 2).sum(1).clamp(min=1e-6)


def motion_moments(frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """First spatial moments of each channel's temporal trend over the patch grid: frames [B, F, 1 + P, D] (token
    0, the mean token, is left out) -> [B, 2 * D] float32, (x, y) per channel with coordinates in [-1, 1]."""
    trend = temporal_trend(frames[:, :, 1:].float(), frame_mask)  # [B, P, D]; small differences: float32
    grid = math.isqrt(trend.shape[1])
    if grid * grid != trend.shape[1]:
        raise ValueError(f"motion moments need a square patch grid, got {trend.shape[1]} patches")
    c = torch.linspace(-1.0, 1.0, grid, device=frames.device)
    xy = torch.stack([c.repeat(grid), c.repeat_interleave(grid)], 1)  # [P, 2], rows of patches
    return torch.einsum("bpd,pc->bdc", trend, xy).flatten(1) / trend.shape[1]


MOTION_GAIN = 4.0  # see the module docstring and docs/experiments.md


class TemporalAggregator(nn.Module):
    def __init__(self, cfg: VideoConfig, width: int):
        super().__init__()
        self.kind = cfg.aggregator
        self.frame_embed = nn.Parameter(torch.zeros(1, cfg.max_frames, 1, width))
        nn.init.normal_(self.frame_embed, std=0.02)
        attention = cfg.aggregator == "attention"
        self.blocks = nn.ModuleList(TemporalBlock(width, cfg.heads) for _ in range(cfg.layers if attention else 0))
        self.motion = nn.Linear(2 * width, width, bias=False) if attention else None
        if self.motion is not None:
            nn.init.zeros_(self.motion.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Mean pooling has no temporal transformer nor motion summary: their weights, in a checkpoint of the
        `attention` aggregator, are left unused, so such a checkpoint fine-tunes with either aggregator."""
        unused = tuple(prefix + name for name, gone in (("blocks.", not self.blocks), ("motion.", self.motion is None))
                       if gone)
        for key in [k for k in state_dict if k.startswith(unused)]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @contextmanager
    def as_mean(self):
        """Within the block the aggregator is plain mean pooling on the same weights (the temporal transformer and
        the motion summary are left out)."""
        blocks, motion = self.blocks, self.motion
        self.blocks, self.motion = nn.ModuleList(), None
        try:
            yield self
        finally:
            self.blocks, self.motion = blocks, motion

    def forward(self, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """frames [B, F, T, D] (T tokens per frame), frame_mask [B, F] bool (True = a real frame) -> [B, T, D]."""
        b, f, t, d = frames.shape
        if f > self.frame_embed.shape[1]:
            raise ValueError(f"{f} frames per clip, but model.video.max_frames is {self.frame_embed.shape[1]}")
        x = frames + self.frame_embed[:, :f].to(frames.dtype)  # [B, F, T, D]
        if self.blocks:
            x = x.permute(0, 2, 1, 3).reshape(b * t, f, d)  # [B * T, F, D]: a sequence over time per position
            m = frame_mask.repeat_interleave(t, 0)  # [B * T, F]
            for block in self.blocks:
                x = block(x, m)
            x = x.view(b, t, f, d).permute(0, 2, 1, 3)
        w = frame_mask.to(x.dtype)[:, :, None, None]  # [B, F, 1, 1]
        out = (x * w).sum(1) / w.sum(1).clamp(min=1)  # [B, T, D]: the mean over real frames
        if self.motion is not None:
            moments = motion_moments(frames, frame_mask)
            motion = MOTION_GAIN * self.motion(F.layer_norm(moments, moments.shape[-1:]).to(x.dtype))  # [B, D]
            out = torch.cat([out[:, :1] + motion[:, None], out[:, 1:]], 1)  # the clip token only
        return out
