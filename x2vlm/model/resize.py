"""Resizing position tables and frame embeddings, so that weights trained at one resolution or frame count serve
another.

- Relative position bias tables (BEiT / BEiT-2, one per block): rows are the (2s - 1)^2 offsets (dy, dx) of an
  s x s patch grid, row-major, then 3 rows for [CLS] (cls-to-token, token-to-cls, cls-to-cls), which are kept.
  The offset grid is resampled per head as BEiT's fine-tuning code does it: the old offsets are placed on the
  new grid at geometric-progression distances (the smallest offsets stay where they are, the far ones spread out)
  and a cubic spline through them (not-a-knot ends, the interpolant of `interp2d(kind='cubic')` on a grid) is read
  at the new integer offsets. The spline is computed here; nothing comes from SciPy.
- Absolute position tables [1, prefix + s^2, D] (ViT, the fusion encoder's vision positions): the grid part is
  resized bicubically, the prefix rows are kept.
- Frame embeddings [1, F, 1, W]: the first frames are kept; extra frames get the mean of the old ones, so that
  under mean pooling over frames (the constant the embedding adds) nothing changes.
"""
from __future__ import annotations

import math

import torch

EXTRA_ROWS = 3  # [CLS] rows at the end of a relative position bias table


def _poly_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Lagrange interpolation through all points x [n] read at xq [m] as a matrix [m, n]."""
    w = torch.ones(len(xq), len(x), dtype=torch.float64)
    for j in range(len(x)):
        for k in range(len(x)):
            if k != j:
                w[:, j] *= (xq - x[k]) / (x[j] - x[k])
    return w


def spline_matrix(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """The cubic spline with not-a-knot ends through (x [n], y) read at xq [m], as a matrix W [m, n] with
    values = W @ y (spline interpolation is linear in y). Points outside [x0, x(n-1)] extend the end pieces.
    Fewer than 4 points: the interpolating polynomial (which the not-a-knot spline then is)."""
    x, xq = x.double(), xq.double()
    n = len(x)
    if n < 4:
        return _poly_matrix(x, xq)
    h = x[1:] - x[:-1]  # [n - 1]
    # Second derivatives M = A^-1 R y: continuity of the first derivative at the inner knots, and of the third
    # derivative across the first and the last inner knot (not-a-knot).
    a = torch.zeros(n, n, dtype=torch.float64)
    r = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, n - 1):
        a[i, i - 1], a[i, i], a[i, i + 1] = h[i - 1], 2 * (h[i - 1] + h[i]), h[i]
        r[i, i - 1], r[i, i], r[i, i + 1] = 6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]
    a[0, 0], a[0, 1], a[0, 2] = h[1], -(h[0] + h[1]), h[0]
    a[-1, -3], a[-1, -2], a[-1, -1] = h[-1], -(h[-2] + h[-1]), h[-2]
    second = torch.linalg.solve(a, r)  # [n, n]: M = second @ y
    # On piece i (x_i <= t <= x_i+1), with u = x_i+1 - t, v = t - x_i:
    # S(t) = M_i u^3 / 6h + M_i+1 v^3 / 6h + (y_i / h - M_i h / 6) u + (y_i+1 / h - M_i+1 h / 6) v
    piece = (torch.searchsorted(x, xq, right=True) - 1).clamp(0, n - 2)  # [m]
    hi, u, v = h[piece], x[piece + 1] - xq, xq - x[piece]
    rows = torch.arange(len(xq))
    values = torch.zeros(len(xq), n, dtype=torch.float64)
    values[rows, piece] += u / hi
    values[rows, piece + 1] += v / hi
    curvature = (u ** 3 / (6 * hi) - hi * u / 6)[:, None] * second[piece] + \
        (v ** 3 / (6 * hi) - hi * v / 6)[:, None] * second[piece + 1]
    return values + curvature


def geometric_offsets(src_half: int, dst_half: int) -> torch.Tensor:
    """Where the offsets -src_half..src_half of the old grid sit on the new one (BEiT's placement): offset k > 0
    at 1 + q + ... + q^(k-1), with q chosen so that offset src_half lands on dst_half (q = 1 at the same size);
    symmetric, 0 at 0."""
    powers = torch.arange(src_half, dtype=torch.float64)
    q = 1.0
    if src_half != dst_half:
        lo, hi = 0.0, max(2.0, float(dst_half))  # 1 + q + ... grows with q: bisect
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((mid ** powers).sum()) < dst_half else (lo, mid)
        q = (lo + hi) / 2
    dist = torch.cumsum(q ** powers, 0)  # [src_half]
    return torch.cat([-dist.flip(0), torch.zeros(1, dtype=torch.float64), dist])


def rel_pos_grid(rows: int) -> int:
    """Side of the offset grid of a relative position bias table with `rows` rows ((2s - 1)^2 + 3)."""
    side = math.isqrt(rows - EXTRA_ROWS)
    if side * side != rows - EXTRA_ROWS or side % 2 == 0:
        raise ValueError(f"a relative position bias table has (2s - 1)^2 + {EXTRA_ROWS} rows, got {rows}")
    return side


def resize_rel_pos_table(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A relative position bias table [R, H] resized to `rows` rows (see the module docstring)."""
    src, dst = rel_pos_grid(table.shape[0]), rel_pos_grid(rows)
    if src == dst:
        return table.clone()
    grid, extra = table[:-EXTRA_ROWS].double(), table[-EXTRA_ROWS:]
    w = spline_matrix(geometric_offsets(src // 2, dst // 2),
                      torch.arange(-(dst // 2), dst // 2 + 1, dtype=torch.float64))  # [dst, src]
    z = grid.T.reshape(-1, src, src)  # [H, src, src]: (dy, dx) per head
    out = w @ z @ w.T  # [H, dst, dst]: separable in dy and dx
    return torch.cat([out.reshape(len(z), -1).T.to(table.dtype), extra])


def resize_abs_pos(table: torch.Tensor, grid: int, prefix: int) -> torch.Tensor:
    """An absolute position table [1, prefix + s^2, D] resized to a grid x grid patch grid (bicubic); the prefix
    rows ([CLS], registers, the fusion's token-0 row) are kept."""
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(table.float(), new_size=[grid, grid], num_prefix_tokens=prefix,
                                  interpolation="bicubic", antialias=True).to(table.dtype)


def resize_frames(embed: torch.Tensor, frames: int) -> torch.Tensor:
    """A frame embedding [1, F, 1, W] for `frames` frames: the first ones kept, extra ones set to the mean."""
    if frames <= embed.shape[1]:
        return embed[:, :frames].clone()
    extra = embed.mean(1, keepdim=True).expand(-1, frames - embed.shape[1], -1, -1)
    return torch.cat([embed, extra], 1)
