"""Box regression losses for normalised (cx, cy, w, h) boxes: L1 and 1 - generalised IoU."""
from __future__ import annotations

import torch

EPS = 1e-7


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching rows of two [M, 4] (x0, y0, x1, y1) tensors:
    IoU - (enclosing area - union) / enclosing area."""
    inter_w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    inter_h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = inter_w * inter_h
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    union = area_a + area_b - inter
    enclose = ((torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])) *
               (torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])))
    return inter / union.clamp(min=EPS) - (enclose - union) / enclose.clamp(min=EPS)


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [M, 4] normalised (cx, cy, w, h). Returns (L1 summed over the 4 coordinates, 1 - GIoU),
    each averaged over the M boxes, in float32."""
    pred, target = pred.float(), target.float()
    n = max(1, pred.shape[0])
    l1 = (pred - target).abs().sum() / n
    giou_loss = (1 - giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).sum() / n
    return l1, giou_loss
