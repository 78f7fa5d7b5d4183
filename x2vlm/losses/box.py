"""Box regression losses for normalised (cx, cy, w, h) boxes: L1 and 1 - generalised IoU."""
from __future__ import annotations

import torch

from x2vlm.boxes import cxcywh_to_xyxy, giou


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [M, 4] normalised (cx, cy, w, h). Returns (L1 summed over the 4 coordinates, 1 - GIoU),
    each averaged over the M boxes, in float32."""
    pred, target = pred.float(), target.float()
    n = max(1, pred.shape[0])
    l1 = (pred - target).abs().sum() / n
    giou_loss = (1 - giou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(target))).sum() / n
    return l1, giou_loss
