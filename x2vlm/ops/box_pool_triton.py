"""Triton kernels for `box_pool`: one program per (box, channel block).

Forward sums the box's patches row by row in float32 and stores the mean in the output dtype. Backward adds
g / area into every patch of the box of a float32 d(feats) buffer with atomics (boxes may overlap), then casts.
Values are converted to float32 right after loading and back on store, which also keeps bfloat16 correct under
the CPU interpreter (TRITON_INTERPRET=1), where bfloat16 arithmetic is not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_D = 64


@triton.jit
def _box_of(boxes, m):
    """Box m's (c0, r0, c1, r1)."""
    return tl.load(boxes + m * 4), tl.load(boxes + m * 4 + 1), tl.load(boxes + m * 4 + 2), tl.load(boxes + m * 4 + 3)


@triton.jit
def _box_sum_fwd(feats, boxes, image_idx, out, P, D, GRID, BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    c0, r0, c1, r1 = _box_of(boxes, m)
    base = feats + tl.load(image_idx + m) * P * D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for r in range(r0, r1):
        for c in range(c0, c1):
            acc += tl.load(base + (r * GRID + c) * D + offs, mask=dmask, other=0.0).to(tl.float32)
    area = ((c1 - c0) * (r1 - r0)).to(tl.float32)
    tl.store(out + m * D + offs, (acc / area).to(out.dtype.element_ty), mask=dmask)


@triton.jit
def _box_sum_bwd(grad_out, boxes, image_idx, grad_feats, P, D, GRID, BLOCK_D: tl.constexpr):
    m = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs < D
    c0, r0, c1, r1 = _box_of(boxes, m)
    area = ((c1 - c0) * (r1 - r0)).to(tl.float32)
    g = tl.load(grad_out + m * D + offs, mask=dmask, other=0.0).to(tl.float32) / area
    base = grad_feats + tl.load(image_idx + m) * P * D
    for r in range(r0, r1):
        for c in range(c0, c1):
            tl.atomic_add(base + (r * GRID + c) * D + offs, g, mask=dmask)


class _BoxPoolTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: Tensor, grid_box: Tensor, image_idx: Tensor, grid: int) -> Tensor:
        n, p, d = feats.shape
        m = grid_box.shape[0]
        out = feats.new_empty(m, d)
        if m:
            _box_sum_fwd[(m, triton.cdiv(d, BLOCK_D))](feats, grid_box, image_idx, out, p, d, grid,
                                                      BLOCK_D=BLOCK_D)
        ctx.save_for_backward(grid_box, image_idx)
        ctx.shape, ctx.grid, ctx.dtype = feats.shape, grid, feats.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grid_box, image_idx = ctx.saved_tensors
        n, p, d = ctx.shape
        grad = torch.zeros(n, p, d, dtype=torch.float32, device=grad_out.device)
        m = grid_box.shape[0]
        if m:
            _box_sum_bwd[(m, triton.cdiv(d, BLOCK_D))](grad_out.contiguous(), grid_box, image_idx, grad, p, d,
                                                      ctx.grid, BLOCK_D=BLOCK_D)
        return grad.to(ctx.dtype), None, None, None


def box_pool_triton(feats: Tensor, grid_box: Tensor, image_idx: Tensor, grid: int) -> Tensor:
    """feats [N, P, D], grid_box [M, 4] int64 (c0, r0, c1, r1), image_idx [M] -> [M, D] box means."""
    return _BoxPoolTriton.apply(feats.contiguous(), grid_box.contiguous(), image_idx.contiguous(), grid)
