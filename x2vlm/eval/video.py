"""Whether a model can tell the direction of a motion: captions with their direction word swapped.

For each held-out clip whose caption names a direction (left/right/up/down), the ITC similarity of the clip with
its caption is compared with its similarity to the same caption with the opposite direction; and the same for
the clip played backwards, for which the swapped caption is the true one. Mean pooling over time makes a clip and
its reverse look the same, so the two accuracies add up to one and their mean is 0.5 whatever the weights: the
mean aggregator cannot tell directions. The probe is run with the model's own aggregator and, on the same
weights, with plain mean pooling.
"""
from __future__ import annotations

import re

import torch

from x2vlm.eval.ranking import model_device

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up", "upwards": "downwards",
            "downwards": "upwards"}
DIRECTION = re.compile(r"\b(" + "|".join(OPPOSITE) + r")\b")


def swap_direction(caption: str) -> str | None:
    """The caption with every direction word replaced by its opposite; None when it names no direction."""
    if not DIRECTION.search(caption):
        return None
    return DIRECTION.sub(lambda m: OPPOSITE[m.group(1)], caption)


@torch.no_grad()
def direction_accuracy(model, videos: torch.Tensor, frame_mask: torch.Tensor, captions: list, tokenize,
                       batch: int = 32) -> dict:
    """{"forward_acc", "reversed_acc", "mean_acc", "n", "chance"} over the clips whose caption names a
    direction. A reversed clip keeps its padding frames at the end."""
    model.eval()
    device = model_device(model)
    picked = [(i, swap_direction(c)) for i, c in enumerate(captions)]
    picked = [(i, s) for i, s in picked if s is not None]
    if not picked:
        return {"n": 0}
    idx = torch.tensor([i for i, _ in picked])
    true_ids, true_atts = tokenize([captions[i] for i, _ in picked])
    swap_ids, swap_atts = tokenize([s for _, s in picked])
    t_true = model.text_feat(model.encode_text(true_ids.to(device), true_atts.to(device))).float()
    t_swap = model.text_feat(model.encode_text(swap_ids.to(device), swap_atts.to(device))).float()
    fwd, rev = [], []
    for s in range(0, len(idx), batch):
        v, m = videos[idx[s:s + batch]], frame_mask[idx[s:s + batch]]
        backwards = torch.stack([torch.cat([c[k].flip(0), c[~k]]) for c, k in zip(v, m)])
        for clips, out in ((v, fwd), (backwards, rev)):
            out.append(model.image_feat(model.encode_video(clips.to(device), m.to(device))).float())
    fwd, rev = torch.cat(fwd), torch.cat(rev)
    forward_acc = float(((fwd * t_true).sum(1) > (fwd * t_swap).sum(1)).float().mean())
    reversed_acc = float(((rev * t_swap).sum(1) > (rev * t_true).sum(1)).float().mean())
    return {"forward_acc": forward_acc, "reversed_acc": reversed_acc, "mean_acc": (forward_acc + reversed_acc) / 2,
            "n": len(picked), "chance": 0.5}


def direction_probe(model, videos, frame_mask, captions, tokenize) -> dict:
    """direction_accuracy with the model's aggregator and, on the same weights, with plain mean pooling."""
    out = {model.temporal.kind: direction_accuracy(model, videos, frame_mask, captions, tokenize)}
    if model.temporal.kind != "mean":
        with model.temporal.as_mean():
            out["mean"] = direction_accuracy(model, videos, frame_mask, captions, tokenize)
    return out
