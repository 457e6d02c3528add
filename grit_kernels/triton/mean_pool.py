"""Masked mean pooling in Triton: the triton backend of ``mean_pool``.

    forward(hidden, mask, cu_seqlens, skip, normalize, weighted) -> out (B, D), norm (B,), den (B,) fp32
    backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize, weighted) -> d hidden

Napkin math: a bandwidth-bound reduction. Forward reads hidden once (B*S*D elements, 2 bytes
in bf16) plus B*S fp32 weights and writes B*D fp32; about 2 FLOPs per element read, far below
any GPU's FLOP/byte balance, so the goal is HBM bandwidth (>= 85% on an H100). Backward reads
the (B, D) gradient and writes hidden's size once.

Same contract as csrc/mean_pool.h. One program per (row, block of D columns) walks the row's
tokens in tiles of BLOCK_S, so hidden is read once; the L2 normalisation is fused when one
program covers the whole row (D <= BLOCK_D), and otherwise done on the (B, D) fp32 result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _shared
from ._common import splat

NORM_EPS = _shared.NORM_EPS
_NORM_EPS_K = tl.constexpr(NORM_EPS)  # kernels may only read constexpr globals


def forward(hidden, mask, cu_seqlens, skip, normalize: bool, weighted: bool):
    weights = _shared.padded_weights(mask, weighted) if mask is not None else None
    return _launch_forward(hidden, weights, cu_seqlens, skip, normalize, weighted)


def backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize: bool, weighted: bool):
    weights = _shared.padded_weights(mask, weighted) if mask is not None else None
    dy = _shared.grad_of_mean(grad_out, out, norm, normalize)
    return _launch_backward(hidden, weights, cu_seqlens, skip, dy, den, weighted)


@triton.jit
def _row_bounds(b, S, cu_ptr, skip_ptr, PACKED: tl.constexpr):
    """First token of row b in the token dim, its length, and its first pooled position."""
    if PACKED:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = tl.load(cu_ptr + b + 1).to(tl.int64) - start
        first = tl.minimum(tl.load(skip_ptr + b).to(tl.int64), length)
    else:
        start = b.to(tl.int64) * S
        length = start * 0 + S  # (S may arrive as a constexpr when it is 1)
        first = start * 0
    return start, length, first


@triton.jit
def _token_weights(b, s, start, length, first, S, w_ptr, PACKED: tl.constexpr, WEIGHTED: tl.constexpr):
    """(BLOCK_S,) weights of positions s of row b (0 outside the row or before `first`)."""
    inside = s < length
    if PACKED:
        w = tl.where(inside & (s >= first), 1.0, 0.0)
        if WEIGHTED:
            w = w * (s - first + 1).to(tl.float32)
    else:
        w = tl.load(w_ptr + b.to(tl.int64) * S + s, mask=inside, other=0.0)
    return w


@triton.jit(do_not_specialize=["S"])
def _mean_pool_fwd_kernel(
    h_ptr, w_ptr, cu_ptr, skip_ptr, out_ptr, norm_ptr, den_ptr,
    S, D,
    PACKED: tl.constexpr, WEIGHTED: tl.constexpr, FUSED_NORM: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start, length, first = _row_bounds(b, S, cu_ptr, skip_ptr, PACKED)

    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    den = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for s0 in range(0, length, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        w = _token_weights(b, s, start, length, first, S, w_ptr, PACKED, WEIGHTED)
        rows = (start + s)[:, None] * D + cols[None, :]
        # Tokens of weight 0 (the instruction, padding) are not loaded.
        x = tl.load(h_ptr + rows, mask=(w != 0)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * x, axis=0)
        den += w
    total = tl.sum(den, axis=0)
    y = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    if FUSED_NORM:  # this program holds the whole row
        nrm = tl.sqrt(tl.sum(y * y, axis=0))
        tl.store(norm_ptr + b, nrm)
        if NORMALIZE:
            y = y / tl.maximum(nrm, _NORM_EPS_K)
    tl.store(out_ptr + b.to(tl.int64) * D + cols, y, mask=col_ok)
    if tl.program_id(1) == 0:
        tl.store(den_ptr + b, total)


@triton.jit(do_not_specialize=["B", "S", "T"])
def _mean_pool_bwd_kernel(
    h_ptr, w_ptr, cu_ptr, skip_ptr, dy_ptr, den_ptr, dh_ptr,
    B, S, D, T,
    PACKED: tl.constexpr, WEIGHTED: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Program b < B writes every token of row b; program B zeroes the tokens past the last
    # row, so each token of dh is written exactly once (no memset pass). Needs B >= 1.
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    is_row = b < B
    bb = tl.minimum(b, B - 1)
    row_start, row_length, first = _row_bounds(bb, S, cu_ptr, skip_ptr, PACKED)
    if PACKED:
        tail_start = tl.load(cu_ptr + B).to(tl.int64)
    else:
        tail_start = (B + 0 * b).to(tl.int64) * S
    start = tl.where(is_row, row_start, tail_start)
    length = tl.where(is_row, row_length, T - tail_start)
    den = tl.maximum(tl.load(den_ptr + bb), 1.0)
    row_ok = splat(b, BLOCK_D) < B
    dy = tl.load(dy_ptr + bb.to(tl.int64) * D + cols, mask=col_ok & row_ok, other=0.0)  # 0 for the tail
    for s0 in range(0, length, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        w = _token_weights(bb, s, row_start, row_length, first, S, w_ptr, PACKED, WEIGHTED)
        g = (w / den)[:, None] * dy[None, :]
        rows = (start + s)[:, None] * D + cols[None, :]
        tl.store(dh_ptr + rows, g.to(dh_ptr.dtype.element_ty), mask=(s < length)[:, None] & col_ok[None, :])


def _blocks(D: int) -> tuple[int, int]:
    block_d = min(triton.next_power_of_2(D), 1024)
    block_s = max(1, min(32, 8192 // block_d))
    return block_s, block_d


def _launch_forward(hidden, weights, cu_seqlens, skip, normalize: bool, weighted: bool):
    """hidden (B, S, D) + weights (B, S) fp32, or (T, D) + cu_seqlens/skip -> (out, norm, den) fp32."""
    B, S, D, _ = _shared.pool_layout(hidden, cu_seqlens)
    packed = cu_seqlens is not None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    out, norm, den = torch.empty((B, D), **f32), torch.empty((B,), **f32), torch.empty((B,), **f32)
    if B == 0:
        return out, norm, den
    block_s, block_d = _blocks(D)
    fused_norm = D <= block_d
    dummy = out  # stands in for pointers a layout does not use
    _mean_pool_fwd_kernel[(B, triton.cdiv(D, block_d))](
        hidden, weights if weights is not None else dummy, cu_seqlens if packed else dummy,
        skip if packed else dummy, out, norm, den, S, D,
        PACKED=packed, WEIGHTED=weighted, FUSED_NORM=fused_norm, NORMALIZE=normalize,
        BLOCK_S=block_s, BLOCK_D=block_d,
    )
    if not fused_norm:  # rows wider than one program: normalise the small (B, D) result here
        norm = out.norm(dim=1)
        if normalize:
            out = out / norm.clamp_min(NORM_EPS)[:, None]
    return out, norm, den


def _launch_backward(hidden, weights, cu_seqlens, skip, dy, den, weighted: bool):
    """dy (B, D) fp32 gradient of the unnormalised mean -> d hidden (shape/dtype of hidden)."""
    B, S, D, T = _shared.pool_layout(hidden, cu_seqlens)
    packed = cu_seqlens is not None
    if B == 0 or T == 0:
        return torch.zeros_like(hidden)
    dhidden = torch.empty_like(hidden)
    block_s, block_d = _blocks(D)
    dummy = dy
    _mean_pool_bwd_kernel[(B + 1, triton.cdiv(D, block_d))](
        hidden, weights if weights is not None else dummy, cu_seqlens if packed else dummy,
        skip if packed else dummy, dy, den.contiguous(), dhidden, B, S, D, T,
        PACKED=packed, WEIGHTED=weighted, BLOCK_S=block_s, BLOCK_D=block_d,
    )
    return dhidden
