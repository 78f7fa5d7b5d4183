"""Grounding: a phrase -> a box in the image. Accuracy at IoU 0.5 against the shape's true box, beside the
baseline that answers with the box of a random shape of the same image."""
from __future__ import annotations

import torch


def box_iou_xywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two [M, 4] (x, y, w, h) box tensors."""
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = (torch.minimum(ax2, bx2) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    ih = (torch.minimum(ay2, by2) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = iw * ih
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return inter / union.clamp(min=1e-9)


def cxcywh_norm_to_xywh(boxes: torch.Tensor, size: int) -> torch.Tensor:
    cx, cy, w, h = boxes.float().unbind(-1)
    return torch.stack([(cx - w / 2) * size, (cy - h / 2) * size, w * size, h * size], -1)


@torch.no_grad()
def evaluate_grounding(model, samples, tokenize, image_size: int) -> dict:
    """`samples`: (image tensor [3, H, W], list of (phrase, true box xywh in pixels)) for images with at least
    two shapes. `tokenize(texts) -> (ids, atts)`. Besides accuracy at IoU 0.5 and mean IoU, "right_shape" is
    the share of phrases whose predicted box overlaps their own shape more than any other shape of the image
    (whether the model picks the right object, whatever the precision of the box)."""
    model.eval()
    ious, base, picked = [], [], []
    for image, regions in samples:
        phrases = [p for p, _ in regions]
        truth = torch.tensor([b for _, b in regions], dtype=torch.float32)
        ids, atts = tokenize(phrases)
        vis = model.encode_image(image[None])  # one image for all its phrases
        pred = cxcywh_norm_to_xywh(model.predict_boxes(vis, ids, atts), image_size)
        ious.append(box_iou_xywh(pred, truth))
        # Which shape of the image the predicted box overlaps most: the right one, whatever the precision?
        n = len(regions)
        overlap = box_iou_xywh(pred.repeat_interleave(n, 0), truth.repeat(n, 1)).reshape(n, n)
        picked.append((overlap.argmax(1) == torch.arange(n)) & (overlap.max(1).values > 0))
        # Expected accuracy of answering with a uniformly random shape of the same image, computed exactly.
        pair = box_iou_xywh(truth.repeat_interleave(n, 0), truth.repeat(n, 1)).reshape(n, n)
        base.append((pair >= 0.5).float().mean(1))
    ious, base, picked = torch.cat(ious), torch.cat(base), torch.cat(picked)
    return {"acc_iou50": float((ious >= 0.5).float().mean()), "mean_iou": float(ious.mean()), "n": len(ious),
            "right_shape": float(picked.float().mean()),
            "random_shape_baseline_acc_iou50": float(base.mean())}
