"""Image-text contrastive (InfoNCE) loss in memory linear in the batch, with ITM hard negatives drawn on the way.

The loss is "local loss + gather with grad": this rank's B rows against the N rows gathered from all ranks (the
gather's backward sends each rank the gradient of its own rows), in both directions (local images vs all texts,
local texts vs all images). With logits s_ij = <row_i, col_j> / temp, row i's term is

    logsumexp_j s_ij - mean of s_ij over the columns j with instance_ids[j] == instance_ids[i]

(the soft cross-entropy with targets uniform over equal ids). The rank's loss is the sum over its rows and both
directions divided by 2 * N / world, so that the mean over ranks is the single-process loss on the whole batch.

The tiled implementations never hold the B x N logits: rows and columns are visited in blocks of `tile`
(a block holds tile x tile logits), a streaming logsumexp runs over the column blocks, and backward recomputes
the blocks (a custom autograd.Function) to produce d(rows), d(columns) and d(temp). The targets need no block:
row i's mean positive logit is <row_i, mean of the columns with its id> / temp, from per-id sums of the columns.
Features may be float32, bfloat16 or float16; logits and sums are float32.

Hard negatives for ITM are drawn in the same pass, among this rank's own pairs only (columns offset .. offset+B
of the gathered set): Gumbel-max over a row's logits with excluded columns at -inf, which is an exact draw from
softmax(logits) restricted to the admissible columns. Column j is excluded for row i when
exclude_ids[i] == exclude_ids[j]; with exclude_ids [B, K], when any of the K keys agree (e.g. the same image, or
the same text). A row with no admissible column gets valid=False and index 0.

impl: "reference" (itc_loss, the plain definition on the full B x N logits, + a Gumbel-max draw on its local
logits), "chunked" (PyTorch blocks; CPU and
fallback), "triton" (kernels; CUDA, or CPU tensors under TRITON_INTERPRET=1), "auto" (triton for CUDA tensors
when Triton is usable, else chunked).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from x2vlm.distributed import all_gather_rows, world_size
from x2vlm.ops.box_pool import resolve_impl


class ContrastiveOutput(NamedTuple):
    loss: Tensor  # scalar, float32
    neg_image: Tensor  # [B] int64: for each local text, a local image index drawn as its hard negative
    neg_image_valid: Tensor  # [B] bool: False when the text has no admissible negative (index is then 0)
    neg_text: Tensor  # [B] int64: for each local image, a local text index
    neg_text_valid: Tensor  # [B] bool


def gumbel(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> Tensor:
    """Standard Gumbel noise -log(-log(U)), float32; U is drawn on the generator's device."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


@torch.no_grad()
def gumbel_max_reference(logits: Tensor, exclude: Tensor,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """logits [B, C], exclude [B, C] bool -> (index [B] int64, valid [B] bool): one draw per row from
    softmax(logits) over the non-excluded columns; rows with none get index 0 and valid False."""
    scores = (logits.float() + gumbel(tuple(logits.shape), logits.device, generator)).masked_fill(exclude, -torch.inf)
    best, idx = scores.max(1)
    valid = best > -torch.inf
    return torch.where(valid, idx, 0), valid


def soft_cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Sum over rows of -sum_j targets_ij * log_softmax(logits)_ij."""
    return -(targets * logits.log_softmax(-1)).sum()


def itc_loss(image_feat: Tensor, text_feat: Tensor, temp: Tensor | float,
             instance_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The definition. image_feat, text_feat [B, E], L2-normalised; pair i = (image i, text i); instance_ids [B]
    optional. Returns (loss, i2t logits [B, B], t2i logits [B, B]): the logits (similarity / temp, detached,
    float32) of this rank's own pairs, for ITM's hard-negative sampling."""
    image_feat, text_feat = image_feat.float(), text_feat.float()
    temp = torch.as_tensor(temp, device=image_feat.device).float().reshape(())
    b = image_feat.shape[0]
    image_all, offset = all_gather_rows(image_feat, with_grad=True)  # [N, E]
    text_all, _ = all_gather_rows(text_feat, with_grad=True)
    if instance_ids is None:
        instance_ids = torch.arange(b, device=image_feat.device) + offset
    ids_all, _ = all_gather_rows(instance_ids)
    positives = (instance_ids[:, None] == ids_all[None, :]).float()  # [B, N]
    targets = positives / positives.sum(1, keepdim=True)

    logits_i2t = image_feat @ text_all.T / temp  # [B, N]: local images vs all texts
    logits_t2i = text_feat @ image_all.T / temp  # [B, N]: local texts vs all images
    rows_per_rank = image_all.shape[0] / world_size()
    loss_i2t = soft_cross_entropy_sum(logits_i2t, targets) / rows_per_rank
    loss_t2i = soft_cross_entropy_sum(logits_t2i, targets) / rows_per_rank
    local = slice(offset, offset + b)
    return (loss_i2t + loss_t2i) / 2, logits_i2t[:, local].detach(), logits_t2i[:, local].detach()


def _block(buf: Tensor, rows: int, cols: int) -> Tensor:
    """A contiguous [rows, cols] view at the start of a flat reusable buffer."""
    return buf[:rows * cols].view(rows, cols)


class _Sampler:
    """Running Gumbel-max over this rank's own columns, fed one block of logits at a time."""

    def __init__(self, rows: int, offset: int, exclude_ids: Tensor, generator: torch.Generator | None):
        """exclude_ids [B, K]: column j is no negative for row i when any key agrees."""
        self.lo, self.hi = offset, offset + exclude_ids.shape[0]
        self.ex, self.generator = exclude_ids, generator
        self.best = torch.full((rows,), -torch.inf, device=exclude_ids.device)
        self.idx = torch.zeros(rows, dtype=torch.long, device=exclude_ids.device)

    def update(self, s: Tensor, r0: int, c0: int, buf: Tensor) -> None:
        """s [R, C]: logits of rows r0.. against gathered columns c0..; buf: scratch of at least R * C floats."""
        lo, hi = max(c0, self.lo), min(c0 + s.shape[1], self.hi)
        if lo >= hi:
            return
        r1 = r0 + s.shape[0]
        noise = _block(buf, s.shape[0], hi - lo)
        if self.generator is None or self.generator.device == noise.device:
            noise.uniform_(generator=self.generator)
        else:
            noise.copy_(torch.rand(noise.shape, generator=self.generator, device=self.generator.device))
        scores = noise.clamp_min_(torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()  # Gumbel
        scores += s[:, lo - c0:hi - c0]
        same = (self.ex[r0:r1, None, :] == self.ex[None, lo - self.lo:hi - self.lo, :]).any(-1)  # [R, C]
        scores.masked_fill_(same, -torch.inf)
        value, j = scores.max(1)
        better = value > self.best[r0:r1]
        self.best[r0:r1] = torch.where(better, value, self.best[r0:r1])
        self.idx[r0:r1] = torch.where(better, j + (lo - self.lo), self.idx[r0:r1])

    def result(self) -> tuple[Tensor, Tensor]:
        valid = self.best > -torch.inf
        return torch.where(valid, self.idx, 0), valid


def _ranges(n: int, tile: int):
    for i in range(0, n, tile):
        yield i, min(i + tile, n)


def chunked_lse(q: Tensor, k: Tensor, temp: Tensor, tile: int, sampler: _Sampler) -> Tensor:
    """q [B, E] rows, k [N, E] columns -> float32 [B]: logsumexp_j of s = q k^T / temp, block by block (two
    reusable tile x tile buffers). Feeds every block of logits to the sampler."""
    b, n = q.shape[0], k.shape[0]
    inv_temp = 1.0 / float(temp)
    size = min(tile, b) * min(tile, n)
    buf_s, buf_w = q.new_empty(size, dtype=torch.float32), q.new_empty(size, dtype=torch.float32)
    lse = torch.full((b,), -torch.inf, device=q.device)
    for r0, r1 in _ranges(b, tile):
        qr = q[r0:r1].float()
        for c0, c1 in _ranges(n, tile):
            s = torch.mm(qr, k[c0:c1].float().T, out=_block(buf_s, r1 - r0, c1 - c0)).mul_(inv_temp)
            top = s.amax(1)
            w = torch.sub(s, top[:, None], out=_block(buf_w, r1 - r0, c1 - c0)).exp_()
            lse[r0:r1] = torch.logaddexp(lse[r0:r1], top + w.sum(1).log())
            sampler.update(s, r0, c0, buf_w)
    return lse


def chunked_softmax_products(q: Tensor, k: Tensor, temp: Tensor, tile: int, lse: Tensor) -> tuple[Tensor, Tensor]:
    """With P = softmax_j(q k^T / temp) (from the forward's lse), returns (P k [B, E], P^T q [N, E]) float32,
    recomputing P block by block in one reusable buffer."""
    b, n = q.shape[0], k.shape[0]
    inv_temp = 1.0 / float(temp)
    buf = q.new_empty(min(tile, b) * min(tile, n), dtype=torch.float32)
    pk = torch.zeros(q.shape, device=q.device)
    pq = torch.zeros(k.shape, device=q.device)
    for r0, r1 in _ranges(b, tile):
        qr = q[r0:r1].float()
        for c0, c1 in _ranges(n, tile):
            kc = k[c0:c1].float()
            p = torch.addmm(-lse[r0:r1, None], qr, kc.T, alpha=inv_temp, out=_block(buf, r1 - r0, c1 - c0))
            p.exp_()
            pk[r0:r1].addmm_(p, kc)
            pq[c0:c1].addmm_(p.T, qr)
    return pk, pq


def positive_means(k: Tensor, row_ids: Tensor, col_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The targets without a B x N mask. Ids are renumbered 0..U-1; returns (row's id [B], column's id [N],
    positives per row [B] float32, mean of the positive columns' features per row [B, E] float32)."""
    _, inverse = torch.unique(torch.cat([row_ids, col_ids]), return_inverse=True)
    rid, cid = inverse[:row_ids.shape[0]], inverse[row_ids.shape[0]:]
    u = int(inverse.max()) + 1
    count = torch.zeros(u, device=k.device).index_add_(0, cid, torch.ones(cid.shape, device=k.device))
    k_sum = torch.zeros(u, k.shape[1], device=k.device).index_add_(0, cid, k.float())
    return rid, cid, count[rid], k_sum[rid] / count[rid, None]


class _InfoNCE(torch.autograd.Function):
    """Sum over rows of (logsumexp_j s_ij - mean of s_ij over positive j), s = q k^T / temp, and the hard-negative
    draw. Returns (loss sum [] float32, negative index [B], valid [B]).

    With targets T (uniform over positives) and P = softmax(s), d sum / d s = P - T, so
    d q = (P k - mean positive k) / temp, d k = (P^T q - T^T q) / temp and d temp = -sum_i q_i . (d q)_i / temp:
    the P parts come from the tiled pass, the T parts from per-id sums."""

    @staticmethod
    def forward(ctx, q, k, temp, row_ids, col_ids, exclude_ids, offset, tile, backend, generator):
        rid, cid, count, k_mean = positive_means(k, row_ids, col_ids)
        if backend == "triton":
            from x2vlm.ops.contrastive_triton import triton_lse

            lse, neg, valid = triton_lse(q, k, temp, exclude_ids, offset, generator)
        else:
            sampler = _Sampler(q.shape[0], offset, exclude_ids, generator)
            lse = chunked_lse(q, k, temp, tile, sampler)
            neg, valid = sampler.result()
        total = lse.sum() - (q.float() * k_mean).sum() / temp
        ctx.save_for_backward(q, k, temp, lse, rid, cid, count, k_mean)
        ctx.tile, ctx.backend = tile, backend
        ctx.mark_non_differentiable(neg, valid)
        return total, neg, valid

    @staticmethod
    def backward(ctx, grad_total, _grad_neg, _grad_valid):
        q, k, temp, lse, rid, cid, count, k_mean = ctx.saved_tensors
        if ctx.backend == "triton":
            from x2vlm.ops.contrastive_triton import triton_softmax_products

            pk, pq = triton_softmax_products(q, k, temp, lse)
        else:
            pk, pq = chunked_softmax_products(q, k, temp, ctx.tile, lse)
        qf = q.float()
        dq = pk - k_mean
        q_share = torch.zeros(int(torch.cat([rid, cid]).max()) + 1, q.shape[1], device=q.device)
        q_share.index_add_(0, rid, qf / count[:, None])  # sum over rows of each id of q_i / count_i
        dk = pq - q_share[cid]
        gs = (qf * dq).sum() / temp  # sum_ij (P - T)_ij s_ij
        scale = grad_total.float() / temp
        return ((dq * scale).to(q.dtype), (dk * scale).to(k.dtype), -gs * scale,
                None, None, None, None, None, None, None)


def contrastive_loss(image_feat: Tensor, text_feat: Tensor, temp: Tensor | float,
                     instance_ids: Tensor | None = None, exclude_ids: Tensor | None = None, impl: str = "auto",
                     tile: int = 4096, generator: torch.Generator | None = None) -> ContrastiveOutput:
    """image_feat, text_feat [B, E] (this rank's pairs, L2-normalised), temp [] or [1] tensor (learnable) or
    float, instance_ids [B] (default: the global row index), exclude_ids [B] or [B, K] (default: instance_ids,
    else own pair only; with K keys a column is excluded when any key agrees). Returns the loss and one hard
    negative per local row in each direction; see the module docstring."""
    impl = resolve_impl(impl, image_feat, ("reference", "chunked", "triton"), "chunked")
    b, device = image_feat.shape[0], image_feat.device
    if exclude_ids is None:
        exclude_ids = instance_ids if instance_ids is not None else torch.arange(b, device=device)
    exclude_ids = exclude_ids.reshape(b, -1)  # [B, K]
    if impl == "reference":
        loss, i2t, t2i = itc_loss(image_feat, text_feat, temp, instance_ids)
        exclude = (exclude_ids[:, None, :] == exclude_ids[None, :, :]).any(-1)  # [B, B]
        neg_image, neg_image_valid = gumbel_max_reference(t2i, exclude, generator)
        neg_text, neg_text_valid = gumbel_max_reference(i2t, exclude, generator)
        return ContrastiveOutput(loss, neg_image, neg_image_valid, neg_text, neg_text_valid)

    temp = torch.as_tensor(temp, device=device).float().reshape(())
    image_all, offset = all_gather_rows(image_feat, with_grad=True)  # [N, E]
    text_all, _ = all_gather_rows(text_feat, with_grad=True)
    if instance_ids is None:
        instance_ids = torch.arange(b, device=device) + offset
    ids_all, _ = all_gather_rows(instance_ids)
    args = (instance_ids, ids_all, exclude_ids, offset, tile, impl, generator)
    i2t, neg_text, neg_text_valid = _InfoNCE.apply(image_feat, text_all, temp, *args)
    t2i, neg_image, neg_image_valid = _InfoNCE.apply(text_feat, image_all, temp, *args)
    rows_per_rank = image_all.shape[0] / world_size()
    loss = (i2t + t2i) / (2 * rows_per_rank)
    return ContrastiveOutput(loss, neg_image, neg_image_valid, neg_text, neg_text_valid)
