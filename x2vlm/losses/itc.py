"""Image-text contrastive loss across ranks: "local loss + gather with grad".

Every rank gathers all ranks' features with autograd (the gather's backward sends each rank the gradient of its
own rows) and computes only its own rows against all columns, in both directions: local images against all
texts, local texts against all images. The rank's loss is the sum of its rows' cross-entropies divided by
N_global / world, so that the mean over ranks of the losses, and of the gradients (DeepSpeed averages them), is
the single-process loss on the concatenated batch, also when ranks hold different numbers of rows. Memory per
rank is B_local x N_global logits instead of N_global x N_global.

Targets are uniform over the columns that share the row's instance id; without ids, a row's only positive is
its own pair.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: torch.Tensor, with_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Concatenate x [n_r, ...] over ranks, where n_r may differ between ranks. Returns (all rows, index of
    this rank's first row). Sizes are gathered first; each rank pads to the largest, gathers, strips padding."""
    world = world_size()
    if world == 1:
        return x, 0
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    padded = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0], *x.shape[1:]))]).contiguous()
    if with_grad:
        import torch.distributed.nn.functional as dist_autograd

        parts = dist_autograd.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
    offset = sum(sizes[:dist.get_rank()])
    return torch.cat([p[:s] for p, s in zip(parts, sizes)]), offset


def soft_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over rows of -sum_j targets_ij * log_softmax(logits)_ij."""
    return -(targets * logits.log_softmax(-1)).sum()


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float,
             instance_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image_feat, text_feat [B, E], L2-normalised; pair i = (image i, text i); instance_ids [B] optional.
    Returns (loss, i2t logits [B, B], t2i logits [B, B]): the logits (similarity / temp, detached, float32) of
    this rank's own pairs, for ITM's hard-negative sampling."""
    image_feat, text_feat = image_feat.float(), text_feat.float()
    temp = torch.as_tensor(temp, device=image_feat.device).float().reshape(())
    b = image_feat.shape[0]
    image_all, offset = gather_rows(image_feat)
    text_all, _ = gather_rows(text_feat)
    if instance_ids is None:
        instance_ids = torch.arange(b, device=image_feat.device) + offset
    ids_all, _ = gather_rows(instance_ids, with_grad=False)
    positives = (instance_ids[:, None] == ids_all[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)

    logits_i2t = image_feat @ text_all.T / temp  # local images vs all texts
    logits_t2i = text_feat @ image_all.T / temp  # local texts vs all images
    rows_per_rank = image_all.shape[0] / world_size()
    loss_i2t = soft_cross_entropy_sum(logits_i2t, targets) / rows_per_rank
    loss_t2i = soft_cross_entropy_sum(logits_t2i, targets) / rows_per_rank
    local = slice(offset, offset + b)
    return (loss_i2t + loss_t2i) / 2, logits_i2t[:, local].detach(), logits_t2i[:, local].detach()
