"""What every objective shares: the visual tokens of a batch, and the one accommodation DeepSpeed needs.

An objective is a callable `objective(model, batch) -> {name: scalar tensor}` with the weighted total under
"loss"; statistics that are not to be differentiated are detached. `X2VLM.forward(batch, objective)` runs it.
"""
from __future__ import annotations

import torch


def visual_tokens(model, batch: dict) -> torch.Tensor:
    """Vision tokens of a batch's images ("images" [N, 3, H, W]) or clips ("videos" [N, F, 3, H, W] with
    "frame_mask" [N, F]): each image or clip once, [N, 1 + P, Dv]."""
    if "videos" in batch:
        return model.encode_video(batch["videos"], batch.get("frame_mask"))
    return model.encode_image(batch["images"])


def every_parameter(loss: torch.Tensor, model, used: set) -> torch.Tensor:
    """The loss, plus a zero that every part of the model not in `used` (names of its children) took part in
    (X2VLM.zero_through). DeepSpeed's ZeRO reduces gradients in buckets across ranks and expects every parameter
    to take part in every step on every rank, also when ranks' batches differ (one rank's region batch may hold
    no region text); a part an objective leaves out for a batch (the temporal aggregator for images, the box head
    for a batch without regions, the pre-training heads for question answering) then gets a zero gradient
    instead of none. The loss's value does not change."""
    unused = [name for name, _ in model.named_children() if name not in used]
    return loss + model.zero_through(unused) if unused else loss
