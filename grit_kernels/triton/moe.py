"""Mixtral experts in Triton: grouped GEMMs over the expert-sorted layout, forward and backward.

Napkin math (Mixtral 8x7B: D = 4096, F = 14336, E = 8, K = 2, bf16): the forward does
6 * T * K * D * F FLOPs (gate, up, down) and must read each touched expert's 3 * D * F weights
once (352 MB for all eight): at T = 4096 tokens that is about 1300 FLOP per weight byte,
compute-bound, so the goal is grouped-GEMM throughput (>= 3x the HF per-expert loop, which
pays a gather, three small GEMMs and a scatter per expert); at decode (T = 1..16) it is a
weight-bandwidth problem and the sorted layout's padding (BM rows per expert tile) matters.

Legend: T tokens, D hidden size, E experts, F expert hidden size, K experts per token,
TK = T * K slots (slot s = t * K + j), M = n_tiles * BM rows of the sorted layout (csrc/moe.h:
``sorted_ids`` maps a sorted row to its slot, TK on padding rows; ``tile_expert`` gives each
BM-row tile its one expert, -1 for the unused tiles at the end; ``offsets`` the padded
first row of each expert).

Forward (two grouped GEMMs, ScatterMoE-style: tokens are never copied into sorted order, the
first GEMM gathers x rows in its loads and the second scatters to slot order in its stores)::

    gate_up:  g, u = x[tok] @ w1_e^T, x[tok] @ w3_e^T   (BM, F)  one pass, both accumulators
              h = silu(g) * u                             -> h (M, F); g, u -> gu (M, 2F) if saved
    down:     y[slot] = weights[slot] * (h @ w2_e^T)      -> y (TK, D) fp32, weight in the epilogue
    (combine: out[t] = sum_j y[t K + j] in fp32, csrc or torch)

Backward (dout (T, D))::

    down_backward:  da = dout[tok] @ w2_e                 (BM, F)
                    dweights partials = sum_f da * h      (n_F_tiles, M) fp32, summed by the caller
                    dg, du = SwiGLU'(g, u) * weights * da -> dgu (M, 2F)
    dx:             dxs[slot] = dg @ w1_e + du @ w3_e     -> (TK, D) fp32, combined like y
    dw_gate_up:     dw1_e = dg^T x[tok], dw3_e = du^T x[tok]   grouped over each expert's rows
    dw_down:        dw2_e = (weights * dout[tok])^T h

Everything stays on the device: tile counts use the upper bound ceil(TK / BM) + E and the
unused tiles exit at once; the dW GEMMs read their row ranges from ``offsets``. Nothing uses
atomics, so results are bitwise reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _shared
from ._common import on_gpu


@dataclass(frozen=True)
class Config:
    block_m: int          # rows per tile of the sorted layout (also the sort's padding)
    block_n: int          # output columns per program of the row GEMMs
    block_n_down: int     # the same for the down projection (one accumulator: room for wider tiles)
    block_k: int          # reduction step of the row GEMMs
    block_dw: int         # output tile side of the dW GEMMs
    block_r: int          # rows per step of the dW GEMMs
    group_m: int          # row tiles per L2 group
    num_warps: int
    num_stages: int
    ieee: bool            # fp32 inputs: full-precision dot instead of tf32


def plan(TK: int, E: int, D: int, F: int, dtype: torch.dtype, on_gpu: bool) -> Config:
    """Tile sizes from the static shapes (so fake tensors give the same layout)."""
    ieee = dtype == torch.float32
    if not on_gpu:  # interpreter: few large programs run fastest; tl.dot needs dims >= 16
        bn = max(16, min(64, triton.next_power_of_2(max(D, F))))
        return Config(block_m=16, block_n=bn, block_n_down=bn, block_k=bn, block_dw=bn, block_r=16, group_m=4,
                      num_warps=4, num_stages=1, ieee=ieee)
    per_expert = TK / max(E, 1)
    # Decode and small batches: few rows per expert; a tall tile would be mostly padding and the
    # kernels are bound by reading the experts' weights, so keep BM at tl.dot's minimum.
    if per_expert <= 16:
        bm = 16
    elif per_expert <= 32:
        bm = 32
    elif per_expert <= 128:
        bm = 64
    else:
        bm = 128
    small = bm <= 32
    wide = 32 if ieee else 64
    # Shared memory per stage, bf16, the largest kernel (dx: dg, du tiles + w1, w3 tiles):
    # small 2*16*128*2 + 2*128*64*2 = 40 KB; BM=128: 2*128*64*2 + 2*64*64*2 = 48 KB; three
    # stages stay under the A100's 163 KB. fp32 halves BK/BN to stay there too.
    # Decode (BM = 16) is bound by reading the chosen experts' weights: narrower column tiles
    # put more programs in flight (the down projection of one token has D / BN of them).
    block_n = (32 if bm == 16 else 64) if small else (wide if bm == 128 else 128)
    # gate_up holds two accumulators (BN = 64 is a 128-wide tile's registers); the down
    # projection holds one, so it takes the usual 128 x 128 x 64 tile (96 KB over 3 stages).
    block_n_down = 128 if bm == 128 and not ieee else block_n
    return Config(block_m=bm, block_n=block_n, block_n_down=block_n_down,
                  block_k=(64 if ieee else 128) if small else wide,
                  block_dw=64 if ieee else 128, block_r=32 if ieee else 64, group_m=8,
                  num_warps=4 if small else 8, num_stages=3, ieee=ieee)


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _tile_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M row tiles share each column tile while it is in L2, and the row
    tiles of one expert are adjacent, so its weight tiles are reused across the group."""
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["TK", "n_tiles"])
def _gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, sorted_ptr, tile_expert_ptr, gu_ptr, h_ptr,
    TK, D, F, n_tiles,
    K_TOP: tl.constexpr, SAVE: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < F
    out_rows = rows.to(tl.int64)[:, None]
    mask = col_ok[None, :] & (rows[:, None] >= 0)
    if e < 0:
        # Past the last expert's tiles (the grid covers the worst case): write zeros, so that
        # the saved activations hold no uninitialised rows, and stop.
        zero = tl.zeros((BM, BN), dtype=h_ptr.dtype.element_ty)
        tl.store(h_ptr + out_rows * F + cols[None, :], zero, mask=mask)
        if SAVE:
            tl.store(gu_ptr + out_rows * (2 * F) + cols[None, :], zero, mask=mask)
            tl.store(gu_ptr + out_rows * (2 * F) + F + cols[None, :], zero, mask=mask)
        return
    slot = tl.load(sorted_ptr + rows)
    valid = slot < TK
    tok = (slot // K_TOP).to(tl.int64)
    ks = tl.arange(0, BK)
    w_base = e.to(tl.int64) * F * D
    x_ptrs = x_ptr + tok[:, None] * D + ks[None, :]               # gather: token rows in the load
    w1_ptrs = w1_ptr + w_base + cols[None, :].to(tl.int64) * D + ks[:, None]  # (BK, BN) view of w1_e^T
    w3_ptrs = w3_ptr + w_base + cols[None, :].to(tl.int64) * D + ks[:, None]
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_ok = ks + k0 < D
        a = tl.load(x_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b1 = tl.load(w1_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b3 = tl.load(w3_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(a, b1, acc_g, input_precision=PREC)
        acc_u = tl.dot(a, b3, acc_u, input_precision=PREC)
        x_ptrs += BK
        w1_ptrs += BK
        w3_ptrs += BK
    h = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(h_ptr + out_rows * F + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(gu_ptr + out_rows * (2 * F) + cols[None, :], acc_g.to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gu_ptr + out_rows * (2 * F) + F + cols[None, :], acc_u.to(gu_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TK", "n_tiles"])
def _down_kernel(
    h_ptr, w2_ptr, sorted_ptr, tile_expert_ptr, rw_ptr, y_ptr,
    TK, D, F, n_tiles,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(D, BN), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    slot = tl.load(sorted_ptr + rows)
    valid = slot < TK
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < D
    ks = tl.arange(0, BK)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * F + ks[None, :]   # sorted rows: contiguous
    w_ptrs = w2_ptr + e.to(tl.int64) * D * F + cols[None, :].to(tl.int64) * F + ks[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, F, BK):
        k_ok = ks + k0 < F
        a = tl.load(h_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        h_ptrs += BK
        w_ptrs += BK
    rw = tl.load(rw_ptr + slot, mask=valid, other=0.0).to(tl.float32)  # routing weight: epilogue
    acc = acc * rw[:, None]
    tl.store(y_ptr + slot.to(tl.int64)[:, None] * D + cols[None, :], acc,
             mask=valid[:, None] & col_ok[None, :])                  # scatter to slot order


@triton.jit(do_not_specialize=["TK", "n_tiles", "M"])
def _down_bwd_kernel(
    dout_ptr, w2_ptr, gu_ptr, sorted_ptr, tile_expert_ptr, rw_ptr, dgu_ptr, dwp_ptr,
    TK, D, F, n_tiles, M,
    K_TOP: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(F, BN), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    slot = tl.load(sorted_ptr + rows)
    valid = slot < TK
    tok = (slot // K_TOP).to(tl.int64)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < F
    ks = tl.arange(0, BK)
    a_ptrs = dout_ptr + tok[:, None] * D + ks[None, :]
    b_ptrs = w2_ptr + e.to(tl.int64) * D * F + ks[:, None].to(tl.int64) * F + cols[None, :]  # w2_e (D, F)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k_ok = ks + k0 < D
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
        a_ptrs += BK
        b_ptrs += BK * F
    r64 = rows.to(tl.int64)[:, None]
    mask = col_ok[None, :] & (rows[:, None] >= 0)
    g = tl.load(gu_ptr + r64 * (2 * F) + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + r64 * (2 * F) + F + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d weights[slot] = <dout_t, w2_e h> = sum_f (dout_t w2_e)_f h_f: this F tile's share.
    tl.store(dwp_ptr + pid_n.to(tl.int64) * M + rows, tl.sum(acc * (silu * u), axis=1))
    rw = tl.load(rw_ptr + slot, mask=valid, other=0.0).to(tl.float32)
    da = acc * rw[:, None]
    dg = da * u * sig * (1.0 + g * (1.0 - sig))
    du = da * silu
    tl.store(dgu_ptr + r64 * (2 * F) + cols[None, :], dg.to(dgu_ptr.dtype.element_ty), mask=mask)
    tl.store(dgu_ptr + r64 * (2 * F) + F + cols[None, :], du.to(dgu_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["TK", "n_tiles"])
def _dx_kernel(
    dgu_ptr, w1_ptr, w3_ptr, sorted_ptr, tile_expert_ptr, dxs_ptr,
    TK, D, F, n_tiles,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_order(tl.program_id(0), n_tiles, tl.cdiv(D, BN), GROUP_M)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    rows = pid_m * BM + tl.arange(0, BM)
    slot = tl.load(sorted_ptr + rows)
    valid = slot < TK
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < D
    ks = tl.arange(0, BK)
    g_ptrs = dgu_ptr + rows.to(tl.int64)[:, None] * (2 * F) + ks[None, :]
    w_off = e.to(tl.int64) * F * D + ks[:, None].to(tl.int64) * D + cols[None, :]  # w_e (F, D)
    w1_ptrs = w1_ptr + w_off
    w3_ptrs = w3_ptr + w_off
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, F, BK):
        k_ok = ks + k0 < F
        dg = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
        du = tl.load(g_ptrs + F, mask=k_ok[None, :], other=0.0)
        b1 = tl.load(w1_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b3 = tl.load(w3_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(dg, b1, acc, input_precision=PREC)
        acc = tl.dot(du, b3, acc, input_precision=PREC)
        g_ptrs += BK
        w1_ptrs += BK * D
        w3_ptrs += BK * D
    tl.store(dxs_ptr + slot.to(tl.int64)[:, None] * D + cols[None, :], acc, mask=valid[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["TK"])
def _dw_kernel(
    a_ptr, b_ptr, sorted_ptr, offsets_ptr, rw_ptr, out_ptr,
    TK, I, J, a_stride, b_stride, a_col0,
    K_TOP: tl.constexpr, A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, A_SCALE: tl.constexpr,
    PREC: tl.constexpr, BI: tl.constexpr, BJ: tl.constexpr, BR: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[e, i, j] = sum over expert e's sorted rows r of A[r, i] * B[r, j], where a row of A
    (B) is the token row of r's slot when A_GATHER (B_GATHER), else sorted row r itself, and
    A's rows are scaled by the slot's routing weight when A_SCALE. Empty experts get zeros."""
    num_i, num_j = tl.cdiv(I, BI), tl.cdiv(J, BJ)
    pid = tl.program_id(0)
    e = pid // (num_i * num_j)
    pid_i, pid_j = _tile_order(pid % (num_i * num_j), num_i, num_j, GROUP_M)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    ci = pid_i * BI + tl.arange(0, BI)
    cj = pid_j * BJ + tl.arange(0, BJ)
    i_ok, j_ok = ci < I, cj < J
    acc = tl.zeros((BI, BJ), dtype=tl.float32)
    for r0 in range(start, end, BR):
        r = r0 + tl.arange(0, BR)
        slot = tl.load(sorted_ptr + r, mask=r < end, other=TK)
        valid = slot < TK
        tok = (slot // K_TOP).to(tl.int64)
        if A_GATHER:
            a_rows = tok
        else:
            a_rows = r.to(tl.int64)
        if B_GATHER:
            b_rows = tok
        else:
            b_rows = r.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * a_stride + a_col0 + ci[None, :], mask=valid[:, None] & i_ok[None, :],
                    other=0.0)
        if A_SCALE:
            w = tl.load(rw_ptr + slot, mask=valid, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * w[:, None]).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + b_rows[:, None] * b_stride + cj[None, :], mask=valid[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC)
    out = out_ptr + e.to(tl.int64) * I * J + ci[:, None].to(tl.int64) * J + cj[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _prec(cfg: Config) -> str:
    """The PREC constexpr of the house style (grit_kernels/triton/_common.py)."""
    return "ieee" if cfg.ieee else "tf32"


def _launch_opts(cfg: Config) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def gate_up(x, w1, w3, sorted_ids, tile_expert, K: int, cfg: Config, save: bool):
    """x (T, D), w1/w3 (E, F, D) -> (gu (M, 2F) if save else an empty tensor, h (M, F)), x's dtype."""
    T, D = x.shape
    F = w1.shape[1]
    n_tiles = tile_expert.numel()
    M = sorted_ids.numel()
    h = torch.empty((M, F), dtype=x.dtype, device=x.device)
    gu = torch.empty((M, 2 * F) if save else (0,), dtype=x.dtype, device=x.device)
    grid = (n_tiles * triton.cdiv(F, cfg.block_n),)
    _gate_up_kernel[grid](
        x, w1, w3, sorted_ids, tile_expert, gu if save else h, h, T * K, D, F, n_tiles,
        K_TOP=K, SAVE=save, PREC=_prec(cfg), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
        **_launch_opts(cfg),
    )
    return gu, h


def down(h, w2, weights_flat, sorted_ids, tile_expert, TK: int, cfg: Config):
    """h (M, F), w2 (E, D, F), weights (TK,) -> y (TK, D) fp32, y[s] = weights[s] * w2_e h_s.
    Rows of slots left out of the layout (expert id out of range) are not written."""
    D, F = w2.shape[1], w2.shape[2]
    n_tiles = tile_expert.numel()
    y = torch.empty((TK, D), dtype=torch.float32, device=h.device)
    grid = (n_tiles * triton.cdiv(D, cfg.block_n_down),)
    _down_kernel[grid](
        h, w2, sorted_ids, tile_expert, weights_flat, y, TK, D, F, n_tiles,
        PREC=_prec(cfg), BM=cfg.block_m, BN=cfg.block_n_down, BK=cfg.block_k, GROUP_M=cfg.group_m, **_launch_opts(cfg),
    )
    return y


def down_backward(dout, w2, gu, weights_flat, sorted_ids, tile_expert, K: int, cfg: Config):
    """dout (T, D) -> dgu (M, 2F) in gu's dtype, dweights partials (ceil(F / BN), M) fp32."""
    T, D = dout.shape
    F = w2.shape[2]
    n_tiles = tile_expert.numel()
    M = sorted_ids.numel()
    dgu = torch.empty_like(gu)
    num_n = triton.cdiv(F, cfg.block_n)
    dwp = torch.empty((num_n, M), dtype=torch.float32, device=dout.device)
    _down_bwd_kernel[(n_tiles * num_n,)](
        dout, w2, gu, sorted_ids, tile_expert, weights_flat, dgu, dwp, T * K, D, F, n_tiles, M,
        K_TOP=K, PREC=_prec(cfg), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m,
        **_launch_opts(cfg),
    )
    return dgu, dwp


def dx(dgu, w1, w3, sorted_ids, tile_expert, TK: int, cfg: Config):
    """dgu (M, 2F) -> dxs (TK, D) fp32, per slot (combined over K by the caller)."""
    F, D = w1.shape[1], w1.shape[2]
    n_tiles = tile_expert.numel()
    dxs = torch.empty((TK, D), dtype=torch.float32, device=dgu.device)
    _dx_kernel[(n_tiles * triton.cdiv(D, cfg.block_n),)](
        dgu, w1, w3, sorted_ids, tile_expert, dxs, TK, D, F, n_tiles,
        PREC=_prec(cfg), BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, GROUP_M=cfg.group_m, **_launch_opts(cfg),
    )
    return dxs


def _dw(a, b, sorted_ids, offsets, rw, out, TK, I, J, a_stride, b_stride, a_col0, K, a_gather, b_gather, a_scale,
        cfg: Config):
    E = out.shape[0]
    bi = bj = cfg.block_dw
    grid = (E * triton.cdiv(I, bi) * triton.cdiv(J, bj),)
    _dw_kernel[grid](
        a, b, sorted_ids, offsets, rw, out, TK, I, J, a_stride, b_stride, a_col0,
        K_TOP=K, A_GATHER=a_gather, B_GATHER=b_gather, A_SCALE=a_scale, PREC=_prec(cfg),
        BI=bi, BJ=bj, BR=cfg.block_r, GROUP_M=cfg.group_m, **_launch_opts(cfg),
    )


def dw_gate_up(dgu, x, sorted_ids, offsets, K: int, cfg: Config):
    """dw1_e = dg^T x[tok], dw3_e = du^T x[tok] over expert e's rows -> (E, F, D) each."""
    T, D = x.shape
    F = dgu.shape[1] // 2
    E = offsets.numel() - 1
    dw1 = torch.empty((E, F, D), dtype=x.dtype, device=x.device)
    dw3 = torch.empty_like(dw1)
    TK = T * K
    _dw(dgu, x, sorted_ids, offsets, dgu, dw1, TK, F, D, 2 * F, D, 0, K, False, True, False, cfg)
    _dw(dgu, x, sorted_ids, offsets, dgu, dw3, TK, F, D, 2 * F, D, F, K, False, True, False, cfg)
    return dw1, dw3


def dw_down(dout, h, weights_flat, sorted_ids, offsets, K: int, cfg: Config):
    """dw2_e = (weights * dout[tok])^T h over expert e's rows -> (E, D, F)."""
    T, D = dout.shape
    F = h.shape[1]
    E = offsets.numel() - 1
    dw2 = torch.empty((E, D, F), dtype=h.dtype, device=h.device)
    _dw(dout, h, sorted_ids, offsets, weights_flat, dw2, T * K, D, F, D, F, 0, K, True, False, True, cfg)
    return dw2


# ---------------------------------------------------------------------------------------
# the triton backend of moe: route / forward / backward (grit_kernels/ops/moe.py)
# ---------------------------------------------------------------------------------------
# Routing, the expert sort and the fp32 combine are small torch ops here (no host sync);
# the cuda backend (grit_kernels/cuda/moe.py) runs the same GEMMs with csrc's versions.

route = _shared.route


def _plan_for(x, w1, K: int) -> Config:
    T, D = x.shape
    E, F, _ = w1.shape
    return plan(T * K, E, D, F, x.dtype, on_gpu(x))


def saved_like(x, w1, experts, save: bool):
    """Empty tensors shaped like what ``forward`` saves (the op's fake implementation)."""
    K = experts.shape[1]
    E, F, _ = w1.shape
    cfg = _plan_for(x, w1, K)
    n_tiles = _shared.max_tiles(x.shape[0] * K, E, cfg.block_m)
    M = n_tiles * cfg.block_m
    i32 = dict(dtype=torch.int32)
    gu = x.new_empty((M, 2 * F)) if save else x.new_empty((0,))
    h = x.new_empty((M, F)) if save else x.new_empty((0,))
    return x.new_empty((M,), **i32), x.new_empty((n_tiles,), **i32), x.new_empty((E + 1,), **i32), gu, h


def forward(x, w1, w2, w3, weights, experts, save: bool, sort=_shared.sort_align, combine=None):
    """-> (out (T, D) in x's dtype, then what ``backward`` reads: sorted_ids (M,), tile_expert,
    offsets (E + 1,), gu (M, 2F) pre-activations, h (M, F) SwiGLU output; gu, h empty unless
    ``save``). ``sort(experts, E, BM)`` and ``combine(y, experts, E, dtype)`` default to torch ops."""
    combine = combine or _shared.combine
    T, D = x.shape
    E = w1.shape[0]
    K = experts.shape[1]
    x, w1, w2, w3 = x.contiguous(), w1.contiguous(), w2.contiguous(), w3.contiguous()
    cfg = _plan_for(x, w1, K)
    sorted_ids, tile_expert, offsets = sort(experts, E, cfg.block_m)
    gu, h = gate_up(x, w1, w3, sorted_ids, tile_expert, K, cfg, save)
    y_SD = down(h, w2, weights.contiguous().reshape(-1), sorted_ids, tile_expert, T * K, cfg)
    out = combine(y_SD, experts, E, x.dtype)
    if not save:  # two distinct empties: custom_op outputs may not alias each other
        gu, h = x.new_empty((0,)), x.new_empty((0,))
    return out, sorted_ids, tile_expert, offsets, gu, h


def backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h, combine=None):
    """-> (dx, dw1, dw2, dw3, dweights), each shaped and typed like its input."""
    combine = combine or _shared.combine
    T, D = x.shape
    E = w1.shape[0]
    K = experts.shape[1]
    TK = T * K
    if TK == 0 or D == 0:
        return (torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3),
                torch.zeros_like(weights))
    if gu.numel() == 0:  # forward ran without saving (no grad then): recompute
        _, sorted_ids, tile_expert, offsets, gu, h = forward(x, w1, w2, w3, weights, experts, True)
    x, w1, w2, w3 = x.contiguous(), w1.contiguous(), w2.contiguous(), w3.contiguous()
    w_flat = weights.contiguous().reshape(-1)
    cfg = _plan_for(x, w1, K)
    # d(gate, up) per sorted row, and the routing weights' gradient as per-F-tile partial dots.
    dgu, dw_part = down_backward(grad_out, w2, gu, w_flat, sorted_ids, tile_expert, K, cfg)
    row_dw = dw_part.sum(dim=0)  # fixed order over F tiles: deterministic
    dweights = torch.zeros(TK + 1, dtype=torch.float32, device=x.device)
    dweights.scatter_(0, sorted_ids.long(), row_dw)  # padding rows land on the scratch slot TK
    dweights = dweights[:TK].reshape(T, K).to(weights.dtype)
    dxs_SD = dx(dgu, w1, w3, sorted_ids, tile_expert, TK, cfg)
    dx_TD = combine(dxs_SD, experts, E, x.dtype)
    dw1, dw3 = dw_gate_up(dgu, x, sorted_ids, offsets, K, cfg)
    dw2 = dw_down(grad_out, h, w_flat, sorted_ids, offsets, K, cfg)
    return dx_TD, dw1, dw2, dw3, dweights
