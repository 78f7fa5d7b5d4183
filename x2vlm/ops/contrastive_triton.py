"""Triton kernels for the tiled contrastive loss (see x2vlm.ops.contrastive for the maths).

q [B, E] rows, k [N, E] columns, s = q k^T / temp computed block by block (BLOCK_M x BLOCK_N logits, the whole
feature dimension at once: BLOCK_E = next power of two >= E). The targets' terms need no B x N work and are
done by the caller; the kernels handle the softmax:
- `_fwd`: one program per row block; streaming logsumexp over the column blocks and the Gumbel-max draw among
  this rank's own columns (Philox noise keyed by (row, local column)).
- `_bwd_rows`: one program per row block; recomputes P = exp(s - lse) block by block and accumulates P k.
- `_bwd_cols`: one program per column block; recomputes P and accumulates P^T q.
Products are accumulated in float32. 16-bit inputs are multiplied in their own dtype on a GPU; under the CPU
interpreter (TRITON_INTERPRET=1), where bfloat16 arithmetic is wrong, everything is converted to float32 after
loading.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton import knobs


@triton.jit
def _load_rows(ptr, rows, n, E, BLOCK_E: tl.constexpr, LOWP: tl.constexpr):
    """[len(rows), BLOCK_E] block of a row-major [n, E] matrix, zero padded; float32 unless LOWP."""
    offs_e = tl.arange(0, BLOCK_E)
    mask = (rows[:, None] < n) & (offs_e[None, :] < E)
    x = tl.load(ptr + rows.to(tl.int64)[:, None] * E + offs_e[None, :], mask=mask, other=0.0)
    if not LOWP:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits(q_blk, k_ptr, cols, N, E, inv_temp, BLOCK_E: tl.constexpr, LOWP: tl.constexpr):
    """(k block, logits [BLOCK_M, BLOCK_N] float32 with -inf past the last column)."""
    k_blk = _load_rows(k_ptr, cols, N, E, BLOCK_E, LOWP)
    if LOWP:
        s = tl.dot(q_blk, tl.trans(k_blk))
    else:
        s = tl.dot(q_blk, tl.trans(k_blk), input_precision="ieee")
    return k_blk, tl.where(cols[None, :] < N, s * inv_temp, -float("inf"))


@triton.jit
def _fwd(q, k, temp, ex_ids, lse_out, best_out, idx_out, B, N, E, offset, seed,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, LOWP: tl.constexpr,
         KEYS: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    inv_temp = 1.0 / tl.load(temp)
    q_blk = _load_rows(q, rows, B, E, BLOCK_E, LOWP)
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    best_j = tl.zeros((BLOCK_M,), tl.int64)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        _, s = _logits(q_blk, k, cols, N, E, inv_temp, BLOCK_E, LOWP)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
        if (c0 + BLOCK_N > offset) & (c0 < offset + B):  # block overlaps this rank's own columns
            local = cols.to(tl.int64) - offset
            lmask = (local >= 0) & (local < B)
            u = tl.rand(seed, rows.to(tl.int64)[:, None] * B + local[None, :])
            noise = -tl.log(-tl.log(tl.maximum(u, 1.1754944e-38)))
            ok = lmask[None, :] & rmask[:, None]
            for key in tl.static_range(KEYS):  # excluded when any key agrees (ex_ids is [B, KEYS] row-major)
                rex = tl.load(ex_ids + rows.to(tl.int64) * KEYS + key, mask=rmask, other=0)
                cex = tl.load(ex_ids + local * KEYS + key, mask=lmask, other=0)
                ok = ok & (rex[:, None] != cex[None, :])
            score = tl.where(ok, s + noise, -float("inf"))
            value = tl.max(score, 1)
            j = tl.argmax(score, 1).to(tl.int64)
            better = value > best
            best = tl.where(better, value, best)
            best_j = tl.where(better, c0 - offset + j, best_j)
    tl.store(lse_out + rows, m_i + tl.log(l_i), mask=rmask)
    tl.store(best_out + rows, best, mask=rmask)
    tl.store(idx_out + rows, best_j, mask=rmask)


@triton.jit
def _bwd_rows(q, k, temp, lse, pk, B, N, E,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, LOWP: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    inv_temp = 1.0 / tl.load(temp)
    q_blk = _load_rows(q, rows, B, E, BLOCK_E, LOWP)
    lse_r = tl.load(lse + rows, mask=rows < B, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        k_blk, s = _logits(q_blk, k, cols, N, E, inv_temp, BLOCK_E, LOWP)
        p = tl.exp(s - lse_r[:, None])  # 0 past the last column
        if LOWP:
            acc += tl.dot(p.to(k_blk.dtype), k_blk)
        else:
            acc += tl.dot(p, k_blk, input_precision="ieee")
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(pk + rows[:, None] * E + offs_e[None, :], acc, mask=(rows[:, None] < B) & (offs_e[None, :] < E))


@triton.jit
def _bwd_cols(q, k, temp, lse, pq, B, N, E,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, LOWP: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inv_temp = 1.0 / tl.load(temp)
    k_blk = _load_rows(k, cols, N, E, BLOCK_E, LOWP)
    acc = tl.zeros((BLOCK_N, BLOCK_E), tl.float32)
    for r0 in range(0, B, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        q_blk = _load_rows(q, rows, B, E, BLOCK_E, LOWP)
        lse_r = tl.load(lse + rows, mask=rows < B, other=float("inf"))  # P = 0 on padding rows
        if LOWP:
            s = tl.dot(q_blk, tl.trans(k_blk))
        else:
            s = tl.dot(q_blk, tl.trans(k_blk), input_precision="ieee")
        p = tl.where(cols[None, :] < N, tl.exp(s * inv_temp - lse_r[:, None]), 0.0)
        if LOWP:
            acc += tl.dot(tl.trans(p.to(q_blk.dtype)), q_blk)
        else:
            acc += tl.dot(tl.trans(p), q_blk, input_precision="ieee")
    offs_e = tl.arange(0, BLOCK_E)
    tl.store(pq + cols[:, None] * E + offs_e[None, :], acc, mask=(cols[:, None] < N) & (offs_e[None, :] < E))


def _config(q: Tensor) -> dict:
    """Block sizes and whether 16-bit inputs are multiplied in their own dtype (GPU only)."""
    block_e = max(16, triton.next_power_of_2(q.shape[1]))
    block = 64 if block_e <= 128 else 32
    lowp = q.dtype in (torch.float16, torch.bfloat16) and q.is_cuda and not knobs.runtime.interpret
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_E=block_e, LOWP=lowp)


def triton_lse(q: Tensor, k: Tensor, temp: Tensor, exclude_ids: Tensor, offset: int,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, E], k [N, E], temp [] float32 -> (logsumexp_j s_ij [B] float32, negative index [B], valid [B]):
    the draw is among columns offset .. offset + B, excluding those with a key of exclude_ids [B, K] equal to
    the row's."""
    b, n = q.shape[0], k.shape[0]
    q, k = q.contiguous(), k.contiguous()
    cfg = _config(q)
    gen_device = generator.device if generator is not None else q.device
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=gen_device))
    lse = torch.empty(b, dtype=torch.float32, device=q.device)
    best = torch.empty(b, dtype=torch.float32, device=q.device)
    idx = torch.empty(b, dtype=torch.long, device=q.device)
    ex = exclude_ids.reshape(b, -1).contiguous()
    _fwd[(triton.cdiv(b, cfg["BLOCK_M"]),)](q, k, temp, ex, lse, best, idx, b, n, q.shape[1], offset, seed,
                                            KEYS=ex.shape[1], **cfg)
    valid = best > -torch.inf
    return lse, torch.where(valid, idx, 0), valid


def triton_softmax_products(q: Tensor, k: Tensor, temp: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """With P = exp(q k^T / temp - lse[:, None]): (P k [B, E], P^T q [N, E]), float32."""
    b, n, e = q.shape[0], k.shape[0], q.shape[1]
    q, k = q.contiguous(), k.contiguous()
    cfg = _config(q)
    pk = torch.empty(b, e, dtype=torch.float32, device=q.device)
    pq = torch.empty(n, e, dtype=torch.float32, device=q.device)
    _bwd_rows[(triton.cdiv(b, cfg["BLOCK_M"]),)](q, k, temp, lse, pk, b, n, e, **cfg)
    _bwd_cols[(triton.cdiv(n, cfg["BLOCK_N"]),)](q, k, temp, lse, pq, b, n, e, **cfg)
    return pk, pq
