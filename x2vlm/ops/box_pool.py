"""Region tokens: the mean of an image's patch features inside a box, without an [M, P, D] intermediate.

Shapes: N images, P = grid * grid patches per image (row-major: patch index = row * grid + col), D channels,
M boxes (one per text). `grid_box` [M, 4] int64 holds (c0, r0, c1, r1) in patch units, end exclusive;
`image_idx` [M] says which image each box lies on (several boxes may share an image, and an image may have none).

Implementations (`impl`):
- "reference": gather each box's image [M, P, D], masked mean. Clear, but O(M * P * D) time and memory.
- "cpu": a summed-area table per image (2-D inclusive prefix sums over the patch grid), built for a few images
  at a time (only images with boxes), and four lookups per box: O(N * P * D + M * D) time and O(SAT_BYTES +
  M * D) working memory. Backward writes
  d(feats) directly: a box sum's gradient is a 2-D box indicator, i.e. +-g / area at the box's four corners of a
  difference array, turned into the indicator by a 2-D cumulative sum.
- "triton": one program per (box, channel block) summing the box's patches; backward adds g / area into every
  patch of the box with atomics (fp32 buffer).
- "auto": "triton" for CUDA tensors when Triton is usable, else "cpu".
All accumulate in float32 and return feats.dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Working memory of "cpu": images are processed in chunks whose float32 tables fit in this many bytes.
SAT_BYTES = 4 << 20


def grid_boxes(boxes_px: Tensor, image_size: int, patch_size: int) -> Tensor:
    """boxes_px [M, 4] pixel (x, y, w, h) -> int64 [M, 4] (c0, r0, c1, r1) in patch units, end exclusive.
    Columns floor(x / p) .. ceil((x + w) / p), rows likewise, clipped to the grid, at least one patch wide."""
    grid = image_size // patch_size
    b = boxes_px.float()
    c0 = torch.floor(b[:, 0] / patch_size).clamp(0, grid - 1)
    r0 = torch.floor(b[:, 1] / patch_size).clamp(0, grid - 1)
    c1 = torch.maximum(torch.ceil((b[:, 0] + b[:, 2]) / patch_size).clamp(max=grid), c0 + 1)
    r1 = torch.maximum(torch.ceil((b[:, 1] + b[:, 3]) / patch_size).clamp(max=grid), r0 + 1)
    return torch.stack([c0, r0, c1, r1], 1).long()


def box_mask(grid_box: Tensor, grid: int) -> Tensor:
    """grid_box [M, 4] (c0, r0, c1, r1) -> bool [M, P], P = grid * grid row-major, True inside the box."""
    r = torch.arange(grid, device=grid_box.device)
    c0, r0, c1, r1 = grid_box.unbind(1)
    cols = (r >= c0[:, None]) & (r < c1[:, None])  # [M, grid]
    rows = (r >= r0[:, None]) & (r < r1[:, None])
    return (rows[:, :, None] & cols[:, None, :]).flatten(1)


def box_area(grid_box: Tensor) -> Tensor:
    """[M, 4] -> float32 [M]: patches inside each box."""
    return ((grid_box[:, 2] - grid_box[:, 0]) * (grid_box[:, 3] - grid_box[:, 1])).float()


def box_pool_reference(feats: Tensor, grid_box: Tensor, image_idx: Tensor, grid: int) -> Tensor:
    """feats [N, P, D], grid_box [M, 4], image_idx [M] -> [M, D]: the definition. Gathers [M, P, D] and takes
    the masked mean (float32 accumulation)."""
    patches = feats[image_idx]  # [M, P, D]
    m = box_mask(grid_box, grid).to(feats.dtype)
    total = torch.bmm(m[:, None, :], patches)[:, 0].float()
    return (total / box_area(grid_box)[:, None]).to(feats.dtype)


def _image_chunks(image_idx: Tensor, n_img: int, per_image_bytes: int):
    """Yields (i0, i1, boxes): consecutive images i0..i1 whose tables fit SAT_BYTES together, and the indices of
    the boxes on them; chunks without a box are skipped."""
    per = max(1, SAT_BYTES // per_image_bytes)
    order = torch.argsort(image_idx)
    starts = torch.arange(0, n_img + per, per, device=image_idx.device).clamp(max=n_img)
    bounds = torch.searchsorted(image_idx[order], starts).tolist()
    for k, i0 in enumerate(range(0, n_img, per)):
        if bounds[k] < bounds[k + 1]:
            yield i0, min(i0 + per, n_img), order[bounds[k]:bounds[k + 1]]


def _cumsum_2d_(x: Tensor) -> Tensor:
    """In-place inclusive prefix sums of x [n, rows, cols, D] over rows and cols (slice adds: faster on CPU than
    cumsum along an inner dimension)."""
    for i in range(1, x.shape[1]):
        x[:, i] += x[:, i - 1]
    for j in range(1, x.shape[2]):
        x[:, :, j] += x[:, :, j - 1]
    return x


class _BoxPoolSAT(torch.autograd.Function):
    """Box means by summed-area table; see the module docstring. Works on chunks of images (those with boxes)."""

    @staticmethod
    def forward(ctx, feats: Tensor, grid_box: Tensor, image_idx: Tensor, grid: int) -> Tensor:
        n, _, d = feats.shape
        g1 = grid + 1
        inv_area = 1.0 / box_area(grid_box)[:, None]
        out = feats.new_zeros(grid_box.shape[0], d)
        sat = None
        for i0, i1, boxes in _image_chunks(image_idx, n, 4 * g1 * g1 * d):
            if sat is None:  # sat[i, r, c] = sum of patches [0, r) x [0, c) of image i; row and column 0 stay 0
                sat = feats.new_zeros(min(n, i1 - i0), g1, g1, d, dtype=torch.float32)
            table = sat[:i1 - i0]
            table[:, 1:, 1:] = feats[i0:i1].view(-1, grid, grid, d)
            flat = _cumsum_2d_(table).view(-1, d)
            img = (image_idx[boxes] - i0) * g1
            c0, r0, c1, r1 = grid_box[boxes].unbind(1)
            total = (flat[(img + r1) * g1 + c1] - flat[(img + r0) * g1 + c1]
                     - flat[(img + r1) * g1 + c0] + flat[(img + r0) * g1 + c0])
            out[boxes] = (total * inv_area[boxes]).to(feats.dtype)
        ctx.save_for_backward(grid_box, image_idx)
        ctx.shape, ctx.grid, ctx.dtype = feats.shape, grid, feats.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grid_box, image_idx = ctx.saved_tensors
        (n, p, d), grid = ctx.shape, ctx.grid
        g = grad_out.float() / box_area(grid_box)[:, None]  # [M, D]
        grad = torch.zeros(n, p, d, dtype=ctx.dtype, device=g.device)
        buf = None
        for i0, i1, boxes in _image_chunks(image_idx, n, 4 * p * d):
            # The gradient of a box sum is its indicator: +-g at the box's 4 corners of a difference array, then
            # 2-D prefix sums. Corners on row or column `grid` fall off the grid and are dropped. For float32 the
            # array is d(feats) itself, otherwise a float32 buffer cast on the way out.
            if ctx.dtype == torch.float32:
                diff = grad[i0:i1].view(-1, d)
            else:
                buf = g.new_empty(min(n, i1 - i0) * p, d) if buf is None else buf
                diff = buf[:(i1 - i0) * p].zero_()
            img = image_idx[boxes] - i0
            c0, r0, c1, r1 = grid_box[boxes].unbind(1)
            for r, c, sign in ((r0, c0, 1.0), (r0, c1, -1.0), (r1, c0, -1.0), (r1, c1, 1.0)):
                keep = (r < grid) & (c < grid)
                diff.index_add_(0, ((img * grid + r) * grid + c)[keep], g[boxes[keep]], alpha=sign)
            _cumsum_2d_(diff.view(-1, grid, grid, d))
            if ctx.dtype != torch.float32:
                grad[i0:i1] = diff.view(-1, p, d)
        return grad, None, None, None


def _triton_usable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_impl(impl: str, x: Tensor, choices: tuple[str, ...], fallback: str) -> str:
    """Map "auto" to "triton" for CUDA tensors when Triton is usable, else to `fallback`."""
    if impl == "auto":
        return "triton" if x.is_cuda and _triton_usable() else fallback
    if impl not in choices:
        raise ValueError(f"impl must be one of {('auto',) + choices}, got {impl!r}")
    return impl


def box_pool(feats: Tensor, grid_box: Tensor, image_idx: Tensor, grid: int, impl: str = "auto") -> Tensor:
    """feats [N, P, D] patch features of each unique image (P = grid * grid), grid_box [M, 4] (c0, r0, c1, r1)
    from `grid_boxes`, image_idx [M] (text -> image) -> region tokens [M, D]: the mean of the patches inside
    each box, in feats.dtype. Differentiable wrt feats."""
    if feats.shape[1] != grid * grid:
        raise ValueError(f"feats has {feats.shape[1]} patches, expected grid * grid = {grid * grid}")
    impl = resolve_impl(impl, feats, ("reference", "cpu", "triton"), "cpu")
    grid_box, image_idx = grid_box.long(), image_idx.long()
    if impl == "reference":
        return box_pool_reference(feats, grid_box, image_idx, grid)
    if impl == "triton":
        from x2vlm.ops.box_pool_triton import box_pool_triton

        return box_pool_triton(feats, grid_box, image_idx, grid)
    return _BoxPoolSAT.apply(feats.contiguous(), grid_box, image_idx, grid)
