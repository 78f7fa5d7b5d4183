"""Grounding: a phrase -> a box in the image. Accuracy at IoU 0.5 against the shape's true box, beside the
baseline that answers with the box of a random shape of the same image."""
from __future__ import annotations

import torch

from x2vlm.boxes import cxcywh_to_xywh, iou, xywh_to_xyxy
from x2vlm.eval.ranking import model_device
from x2vlm.logs import progress


def iou_xywh(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of two [M, 4] xywh tensors."""
    return iou(xywh_to_xyxy(a), xywh_to_xyxy(b))


@torch.no_grad()
def evaluate_grounding(model, samples, tokenize, image_size: int, examples: int = 0) -> dict:
    """`samples`: (image tensor [3, H, W], list of (phrase, true box xywh in pixels)) for images with at least
    two shapes. `tokenize(texts) -> (ids, atts)`. Besides accuracy at IoU 0.5 and mean IoU, "right_shape" is
    the share of phrases whose predicted box overlaps their own shape more than any other shape of the image
    (whether the model picks the right object, whatever the precision of the box). With `examples` = n, also
    the first n images' phrases with their true and predicted boxes (xywh pixels) and IoUs ("examples")."""
    model.eval()
    device = model_device(model)
    ious, base, picked, shown = [], [], [], []
    for image, regions in progress(samples, desc="grounding", unit=" images"):
        phrases = [p for p, _ in regions]
        truth = torch.tensor([b for _, b in regions], dtype=torch.float32)
        ids, atts = tokenize(phrases)
        vis = model.encode_image(image[None].to(device))  # one image for all its phrases
        pred = cxcywh_to_xywh(model.predict_boxes(vis, ids.to(device), atts.to(device)).float().cpu()) * image_size
        ious.append(iou_xywh(pred, truth))
        if len(shown) < examples:
            shown.append({"image": len(ious) - 1, "phrases": phrases, "truth": truth.tolist(),
                          "pred": [[round(v, 2) for v in box] for box in pred.tolist()],
                          "iou": [round(v, 4) for v in ious[-1].tolist()]})
        # Which shape of the image the predicted box overlaps most: the right one, whatever the precision?
        n = len(regions)
        overlap = iou_xywh(pred.repeat_interleave(n, 0), truth.repeat(n, 1)).reshape(n, n)
        picked.append((overlap.argmax(1) == torch.arange(n)) & (overlap.max(1).values > 0))
        # Expected accuracy of answering with a uniformly random shape of the same image, computed exactly.
        pair = iou_xywh(truth.repeat_interleave(n, 0), truth.repeat(n, 1)).reshape(n, n)
        base.append((pair >= 0.5).float().mean(1))
    ious, base, picked = torch.cat(ious), torch.cat(base), torch.cat(picked)
    out = {"acc_iou50": float((ious >= 0.5).float().mean()), "mean_iou": float(ious.mean()), "n": len(ious),
           "right_shape": float(picked.float().mean()),
           "random_shape_baseline_acc_iou50": float(base.mean())}
    return {**out, "examples": shown} if examples else out
