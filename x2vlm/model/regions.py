"""Regions: a box becomes a mask over the patch grid, and the region token is the mean of the patches inside.

Vision token layout: index 0 is the visual CLS, then P = grid * grid patches in row-major order. The region token
itself comes from x2vlm.ops.box_pool (a summed-area table on CPU, a Triton kernel on GPU).
"""
from __future__ import annotations

import torch

from x2vlm.ops import box_mask, grid_boxes


def box_to_patch_mask(boxes: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """boxes [M, 4] (x, y, w, h) in pixels -> bool [M, 1 + P]. Columns floor(x / p) .. ceil((x + w) / p)
    exclusive, rows likewise, clipped to the grid and at least one patch wide (x2vlm.ops.grid_boxes); index 0
    (the CLS) is always on."""
    patches = box_mask(grid_boxes(boxes, image_size, patch_size), image_size // patch_size)
    return torch.cat([torch.ones_like(patches[:, :1]), patches], dim=1)


def xywh_to_cxcywh_norm(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixel (x, y, w, h) -> (cx, cy, w, h) as fractions of the image side, float32: the box head's targets."""
    x, y, w, h = boxes.float().unbind(-1)
    return torch.stack([x + w / 2, y + h / 2, w, h], -1) / image_size
