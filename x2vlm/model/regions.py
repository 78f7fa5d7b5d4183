"""Regions: a box becomes a mask over the patch grid, and the region token is the mean of the patches inside.

Vision token layout: index 0 is the visual CLS, then P = grid * grid patches in row-major order.
"""
from __future__ import annotations

import torch


def box_to_patch_mask(boxes: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """boxes [M, 4] (x, y, w, h) in pixels -> bool [M, 1 + P]. Columns floor(x / p) .. ceil((x + w) / p)
    exclusive, rows likewise, clipped to the grid and at least one patch wide; index 0 (the CLS) is always on."""
    grid = image_size // patch_size
    b = boxes.float()
    x0 = torch.floor(b[:, 0] / patch_size).clamp(0, grid - 1)
    y0 = torch.floor(b[:, 1] / patch_size).clamp(0, grid - 1)
    x1 = torch.maximum(torch.ceil((b[:, 0] + b[:, 2]) / patch_size).clamp(max=grid), x0 + 1)
    y1 = torch.maximum(torch.ceil((b[:, 1] + b[:, 3]) / patch_size).clamp(max=grid), y0 + 1)
    r = torch.arange(grid, device=boxes.device, dtype=torch.float32)
    cols = (r >= x0[:, None]) & (r < x1[:, None])  # [M, grid]
    rows = (r >= y0[:, None]) & (r < y1[:, None])
    patches = (rows[:, :, None] & cols[:, None, :]).flatten(1)
    return torch.cat([torch.ones_like(patches[:, :1]), patches], dim=1)


def pool_regions(vis: torch.Tensor, image_idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """vis [N, 1 + P, D] (each image once), image_idx [M] (text -> image), mask [M, 1 + P] -> region tokens
    [M, D]: the mean of the patches inside each text's box. For an all-ones mask that is the image's mean token;
    a mask with no patch gives a zero token."""
    patches = vis[image_idx, 1:]
    m = mask[:, 1:].to(patches.dtype)
    return torch.bmm(m[:, None, :], patches)[:, 0] / m.sum(1, keepdim=True).clamp(min=1)


def xywh_to_cxcywh_norm(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixel (x, y, w, h) -> (cx, cy, w, h) as fractions of the image side, float32: the box head's targets."""
    x, y, w, h = boxes.float().unbind(-1)
    return torch.stack([x + w / 2, y + h / 2, w, h], -1) / image_size
