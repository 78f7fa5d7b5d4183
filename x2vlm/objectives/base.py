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
    """The loss, with every trainable parameter of the model's parts that are not in `used` (names of its
    children) added at weight zero. DeepSpeed's ZeRO expects every parameter to take part in every step on every
    rank; a part an objective leaves out for a batch (the temporal aggregator for images, the box head for a batch
    without regions, the pre-training heads for question answering) then gets a zero gradient instead of none.
    The loss's value does not change."""
    unused = [p for name, part in model.named_children() if name not in used
              for p in part.parameters() if p.requires_grad]
    if not unused:
        return loss
    return loss + sum(p.sum() for p in unused) * 0.0
