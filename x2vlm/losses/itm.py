"""Image-text matching: labels and the loss.

Within the local batch, each text gets one negative visual sequence and each visual sequence one negative text,
drawn from softmax(contrastive logits) over the columns that may be negatives, in the contrastive loss's own
pass (x2vlm.ops.contrastive_loss). A row where no column may be a negative (a batch of one pair, or every pair
sharing one instance id) has no negative: its draw is a placeholder and its label is -100, so the loss ignores
it instead of teaching that a true pair does not match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def itm_labels(neg_image_valid: torch.Tensor, neg_text_valid: torch.Tensor) -> torch.Tensor:
    """Labels for the 3B ITM pairs [B positives, B (text, negative image), B (negative text, image)]: 1 for a
    positive, 0 for a negative, -100 for a placeholder negative."""
    positives = torch.ones_like(neg_image_valid, dtype=torch.long)
    negatives = torch.where(torch.cat([neg_image_valid, neg_text_valid]), 0, IGNORE).long()
    return torch.cat([positives, negatives])


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the match / no-match logits [3B, 2] in float32, ignoring -100 labels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
