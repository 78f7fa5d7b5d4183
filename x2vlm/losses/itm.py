"""Image-text matching: hard negatives drawn from the contrastive logits, labels, and the loss.

Within the local batch, each text gets one negative visual sequence and each visual sequence one negative text,
drawn with probability softmax(logits) + 1e-5 over the columns that may be negatives. A row where no column may
be a negative (a batch of one pair, or every pair sharing one instance id) has no negative: its draw is a
placeholder and its label is -100, so the loss ignores it instead of teaching that a true pair does not match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, exclude: torch.Tensor,
                          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, B] (similarity / temp), exclude [B, B] bool (True = positive, never a negative).
    Returns (column index [B], valid [B] bool); one multinomial draw per row, all rows at once."""
    weights = (logits.float().softmax(-1) + 1e-5).masked_fill(exclude, 0.0)
    valid = weights.sum(1) > 0
    weights[~valid] = 1.0  # placeholder draw for rows without a negative
    neg = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return neg, valid


def itm_labels(neg_image_valid: torch.Tensor, neg_text_valid: torch.Tensor) -> torch.Tensor:
    """Labels for the 3B ITM pairs [B positives, B (text, negative image), B (negative text, image)]: 1 for a
    positive, 0 for a negative, -100 for a placeholder negative."""
    positives = torch.ones_like(neg_image_valid, dtype=torch.long)
    negatives = torch.where(torch.cat([neg_image_valid, neg_text_valid]), 0, IGNORE).long()
    return torch.cat([positives, negatives])


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the match / no-match logits [3B, 2] in float32, ignoring -100 labels."""
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)
