"""Regions: a box becomes a mask over the patch grid, and the region token is the mean of the patches inside.

Vision token layout: index 0 is the visual CLS, then P = grid * grid patches in row-major order. The region token
itself comes from x2vlm.ops.box_pool (a summed-area table on CPU, a Triton kernel on GPU).
"""
from __future__ import annotations

import torch

from x2vlm.ops import box_mask


def patch_mask(grid_box: torch.Tensor, grid: int) -> torch.Tensor:
    """Boxes in patch units [M, 4] (x2vlm.ops.grid_boxes: columns floor(x / p) .. ceil((x + w) / p) exclusive,
    rows likewise, clipped, at least one patch) -> bool [M, 1 + P], the cross-attention mask of each text:
    index 0 (the CLS / region token) always on, then the patches inside the box."""
    patches = box_mask(grid_box, grid)
    return torch.cat([torch.ones_like(patches[:, :1]), patches], dim=1)

