"""Boxes: conversions between the three layouts the project uses, overlap measures, and clipping.

Layouts (last dimension 4): xywh (corner, width, height; pixels in data and annotations), xyxy (two corners;
overlaps are computed on it) and cxcywh (centre, width, height; the box head predicts it as fractions of the
image side). Tensor functions work row-wise on [..., 4].
"""
from __future__ import annotations

import math

import torch

EPS = 1e-7


def xywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x, y, x + w, y + h], -1)


def cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def xywh_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x, y, w, h = b.unbind(-1)
    return torch.stack([x + w / 2, y + h / 2, w, h], -1)


def cxcywh_to_xywh(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, w, h], -1)


def _overlap(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(intersection, union) areas of matching rows of two [M, 4] xyxy tensors."""
    inter_w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    return inter, area_a + area_b - inter


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two [M, 4] xyxy tensors."""
    inter, union = _overlap(a, b)
    return inter / union.clamp(min=EPS)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching rows of two [M, 4] xyxy tensors: IoU - (enclosing area - union) / enclosing
    area."""
    inter, union = _overlap(a, b)
    enclose = ((torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])) *
               (torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])))
    return inter / union.clamp(min=EPS) - (enclose - union) / enclose.clamp(min=EPS)


def box_ok(box) -> bool:
    """Four finite numbers."""
    return (isinstance(box, (list, tuple)) and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))


def clip_xywh(box, width: float, height: float) -> list[float] | None:
    """An xywh box clipped to a width x height image (floats), or None when no area of it lies inside."""
    x, y, w, h = map(float, box)
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]
