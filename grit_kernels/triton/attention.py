"""FlashAttention-2 in Triton: forward kernel, backward kernels (preprocess, dK/dV, dQ), launchers.

Napkin math (GritLM-7B: Hq = 32, Hkv = 8, Dh = 128, bf16): the forward does 4 * S^2 * Dh FLOPs
per head (QKᵀ and PV; half when causal) and reads q, k, v, writes out once (about
2 * 4 * S * Dh bytes per head): at S = 4096 that is 1024 FLOP per byte, far above an H100's
~300 (989 TFLOP/s over 3.35 TB/s), so it is compute-bound and the goal is tensor-core
throughput (>= 400 TFLOP/s bidirectional at S >= 4k, >= SDPA's flash backend). The backward
does 2.5x the forward's FLOPs (five GEMMs against two).

Same contract as grit_kernels/reference/attention.py (flash-attn's masks). One kernel family
serves causal and bidirectional attention, sliding windows, GQA and both layouts:

* Layout. Every kernel addresses a token as ``base + b*stride_b + (start + s)*stride_s +
  h*stride_h``: padded tensors have start = 0, packed ones stride_b = 0 and start =
  cu_seqlens[b]. Strides are passed, so q/k/v sliced out of a fused QKV need no copy.
* Mask. For the Q block [m0, m0 + BLOCK_M) the keys it may see lie in [lo, hi) (from the
  window, causal = right 0, and Sk), and inside that the blocks that every row sees entirely
  lie in [mid_lo, mid_hi). Blocks outside [lo, hi) are never loaded; only the two boundary
  ranges [lo, mid_lo) and [mid_hi, hi) evaluate the mask. Causal, Sq = Sk, BLOCK_M = BLOCK_N::

        key blocks ->  0   1   2   3
        q block 2:   [ full  ][diag] .   .      lo = 0, mid_lo = 0, mid_hi = 2, hi = 3 blocks

  The dK/dV kernel runs the same reasoning transposed (which Q blocks see a K block), in one
  loop whose boundary blocks branch into the mask (it holds two accumulators: three loops spill).
* Softmax. Online, in fp32, in base 2 (scores scaled by softmax_scale * log2 e, exp2). The
  row max is replaced by 0 while a row has seen nothing, so an empty row gives p = 0, never
  exp(-inf - -inf) = NaN; it ends with l = 0 -> zero output and lse = -inf.
* Backward. P is recomputed from lse (natural log, (B, Hq, Sq) / (Hq, T) fp32); an lse of
  -inf (empty row) is read as +inf so that its P is 0. delta = rowsum(dO * O) - dlse.
  The dK/dV program of a KV head loops over the Hq // Hkv query heads of its group, so
  its gradient is summed in a fixed order without atomics (deterministic); dQ has its own
  kernel over the KV blocks, as in FA2.
* Head dim padded to a power of 2 (D = 96 -> 128) with masked loads: zeros add nothing to q·k.

Block sizes: autotuned on CUDA (configs built on first use, nothing at import;
GRIT_AUTOTUNE=0 takes the first config of each list instead), a fixed config under
TRITON_INTERPRET=1 where numpy runs every tile.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import LN2, LOG2E, autotune_enabled, key_range, precision, softmax_step, visible


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, SEQ_Q, SEQ_K, PACKED: tl.constexpr):
    """(first token, length) of sequence b in q and in k."""
    if PACKED:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        q_len = b * 0 + SEQ_Q
        k_start = b * 0
        k_len = b * 0 + SEQ_K
    return q_start, q_len, k_start, k_len


@triton.jit
def _block_ranges(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """[lo, hi) rounded out to whole blocks, and inside it [mid_lo, mid_hi): the blocks that
    lie within [full_lo, full_hi) entirely (no mask needed)."""
    lo = lo // BLOCK * BLOCK
    hi = tl.maximum((hi + BLOCK - 1) // BLOCK * BLOCK, lo)
    mid_lo = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK * BLOCK, lo), hi)
    mid_hi = tl.minimum(tl.maximum(full_hi // BLOCK * BLOCK, mid_lo), hi)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _kv_range(m0, q_len, k_len, left, right,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of the Q block [m0, m0 + BLOCK_M): [lo, hi) in BLOCK_N multiples, and inside it
    [mid_lo, mid_hi), the blocks every row of the Q block sees whole (no mask needed)."""
    shift = k_len - q_len  # bottom-right aligned diagonal
    m_last = m0 + BLOCK_M - 1
    # Rows past q_len: their results are never stored, any mask is fine for them.
    lo, hi = key_range(m0, m_last, shift, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
    full_lo, full_hi = key_range(m_last, m0, shift, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
    return _block_ranges(lo, hi, full_lo, full_hi, BLOCK_N)


@triton.jit
def _q_range(n0, q_len, k_len, left, right,
             HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query range that sees the K block [n0, n0 + BLOCK_N), the transpose of _kv_range: query i
    sees key j iff j - shift - right <= i <= j - shift + left, the key rule with the roles of
    queries and keys swapped (shift negated, left and right exchanged)."""
    shift = k_len - q_len
    n_last = n0 + BLOCK_N - 1
    lo, hi = key_range(n0, n_last, -shift, q_len, right, left, HAS_LEFT=HAS_RIGHT, HAS_RIGHT=HAS_LEFT)
    full_lo, full_hi = key_range(n_last, n0, -shift, q_len, right, left, HAS_LEFT=HAS_RIGHT, HAS_RIGHT=HAS_LEFT)
    if n_last >= k_len:  # keys past the sequence's end need the mask in every block
        full_hi = full_lo * 0
    return _block_ranges(lo, hi, full_lo, full_hi, BLOCK_M)


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _load(ptrs, mask, MASKED: tl.constexpr):
    """A tile load that carries a mask only where one is needed (boundary blocks, D < BLOCK_D)."""
    if MASKED:
        x = tl.load(ptrs, mask=mask, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, lo, hi, offs_m, q_len, k_len,
                left, right, qk_scale, D,
                MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = lo + tl.arange(0, BLOCK_N)
    # K is loaded row-major (contiguous head dim, vectorised) and transposed in the dot.
    # Pointers advance by one block per step (interior blocks need no index arithmetic).
    k_ptrs = K_base + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V_base + offs_n[:, None] * stride_vs + offs_d[None, :]
    for _n0 in range(lo, hi, BLOCK_N):
        if MASK:
            n_ok = offs_n < k_len
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        else:  # interior: every key exists
            k = _load(k_ptrs, d_ok[None, :], D != BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASK:
            s = tl.where(visible(offs_m, offs_n, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT), s,
                         float("-inf"))
        p, alpha, m_new, l_i = softmax_step(m_i, l_i, s, MAY_BE_EMPTY=MASK)
        if MASK:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            offs_n += BLOCK_N
        else:
            v = _load(v_ptrs, d_ok[None, :], D != BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "SEQ_Q", "SEQ_K", "left", "right",
                                     "SEQ_KEY_Q", "SEQ_KEY_K"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, GROUP, D, qk_scale, left, right,
    SEQ_KEY_Q, SEQ_KEY_K,  # autotune key only: power-of-2 buckets of the longest sequences
    PACKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Heaviest (causal: last) Q blocks first, so the short ones fill the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, SEQ_Q, SEQ_K, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    d_ok = offs_d < D
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    K_base = K + b64 * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_ks
    V_base = V + b64 * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vs

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, mid_lo, mid_hi, hi = _kv_range(m0, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, lo, mid_lo, offs_m,
                                q_len, k_len, left, right, qk_scale, D,
                                MASK=True, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, mid_lo, mid_hi, offs_m,
                                q_len, k_len, left, right, qk_scale, D,
                                MASK=False, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, K_base, V_base, stride_ks, stride_vs, mid_hi, hi, offs_m,
                                q_len, k_len, left, right, qk_scale, D,
                                MASK=True, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b64 * stride_lb + h * stride_lh + rows, lse, mask=m_ok)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "SEQ_Q"])
def _bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_Q,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh,
    SEQ_Q, D,
    PACKED: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, fp32, laid out like lse."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, _k_start, _k_len = _seq_bounds(b, CU_Q, CU_Q, SEQ_Q, SEQ_Q, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse_off = b64 * stride_lb + h * stride_lh + rows
    if HAS_DLSE:
        delta -= tl.load(DLSE + lse_off, mask=m_ok, other=0.0)
    tl.store(DELTA + lse_off, delta, mask=m_ok)


@triton.jit
def _load_row_stats(LSE, DELTA, lse_off, m_ok):
    """lse in base 2 with empty rows (-inf) and rows past the end read as +inf (P = 0), and delta."""
    lse = tl.load(LSE + lse_off, mask=m_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + lse_off, mask=m_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qs, stride_dos,
                 lo, mid_lo, mid_hi, hi, offs_n, q_len, k_len, left, right, qk_scale, D,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs = Q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
    do_ptrs = DO_base + offs_m[:, None] * stride_dos + offs_d[None, :]
    for m0 in range(lo, hi, BLOCK_M):
        m_ok = offs_m < q_len
        mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        do = tl.load(do_ptrs, mask=mask, other=0.0)
        lse, delta = _load_row_stats(LSE_base, DELTA_base, offs_m, m_ok)
        # Transposed tiles (keys x queries): this program owns the keys.
        sT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
        if (m0 < mid_lo) | (m0 >= mid_hi):  # boundary block. Mask the scores, not P: exp2 of
            # a hidden score above lse would overflow.
            seen = visible(offs_m, offs_n, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
            sT = tl.where(tl.trans(seen), sT, float("-inf"))
        pT = tl.math.exp2(sT - lse[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
        offs_m += BLOCK_M
        q_ptrs += BLOCK_M * stride_qs
        do_ptrs += BLOCK_M * stride_dos
    return dk, dv


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "SEQ_Q", "SEQ_K", "left", "right",
                                     "SEQ_KEY_Q", "SEQ_KEY_K"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, GROUP, D, sm_scale, qk_scale, left, right,
    SEQ_KEY_Q, SEQ_KEY_K,
    PACKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, SEQ_Q, SEQ_K, PACKED)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < k_len)[:, None] & (offs_d < D)[None, :]
    cols = (k_start + offs_n).to(tl.int64)
    k = tl.load(K + b64 * stride_kb + kvh * stride_kh + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + b64 * stride_vb + kvh * stride_vh + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo, mid_lo, mid_hi, hi = _q_range(n0, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    q_row0 = b64 * stride_qb + q_start.to(tl.int64) * stride_qs
    do_row0 = b64 * stride_dob + q_start.to(tl.int64) * stride_dos
    lse_row0 = b64 * stride_lb + q_start.to(tl.int64)
    # The query heads of this KV head's group, in order: a fixed summation order, no atomics.
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        Q_base = Q + q_row0 + h * stride_qh
        DO_base = DO + do_row0 + h * stride_doh
        LSE_base = LSE + lse_row0 + h * stride_lh
        DELTA_base = DELTA + lse_row0 + h * stride_lh
        dk, dv = _dkdv_blocks(dk, dv, k, v, Q_base, DO_base, LSE_base, DELTA_base, stride_qs, stride_dos,
                              lo, mid_lo, mid_hi, hi, offs_n, q_len, k_len, left, right, qk_scale, D,
                              HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + kvh * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + kvh * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, lo, hi, offs_m, q_len, k_len,
               left, right, qk_scale, D,
               MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = K_base + offs_n[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = V_base + offs_n[:, None] * stride_vs + offs_d[None, :]
    for _n0 in range(lo, hi, BLOCK_N):
        if MASK:
            mask = (offs_n < k_len)[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=mask, other=0.0)
            v = tl.load(v_ptrs, mask=mask, other=0.0)
        else:
            k = _load(k_ptrs, d_ok[None, :], D != BLOCK_D)
            v = _load(v_ptrs, d_ok[None, :], D != BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if MASK:
            seen = visible(offs_m, offs_n, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
            s = tl.where(seen, s, float("-inf"))
            offs_n += BLOCK_N
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
        k_ptrs += BLOCK_N * stride_ks
        v_ptrs += BLOCK_N * stride_vs
    return dq


@triton.jit(do_not_specialize=["stride_lb", "stride_lh", "SEQ_Q", "SEQ_K", "left", "right",
                                     "SEQ_KEY_Q", "SEQ_KEY_K"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh,
    SEQ_Q, SEQ_K, GROUP, D, sm_scale, qk_scale, left, right,
    SEQ_KEY_Q, SEQ_KEY_K,
    PACKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, SEQ_Q, SEQ_K, PACKED)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    kvh = h // GROUP
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < q_len
    mask = m_ok[:, None] & (offs_d < D)[None, :]
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b64 * stride_dob + h * stride_doh + rows[:, None] * stride_dos + offs_d[None, :], mask=mask,
                 other=0.0)
    lse, delta = _load_row_stats(LSE, DELTA, b64 * stride_lb + h * stride_lh + rows, m_ok)
    K_base = K + b64 * stride_kb + kvh * stride_kh + k_start.to(tl.int64) * stride_ks
    V_base = V + b64 * stride_vb + kvh * stride_vh + k_start.to(tl.int64) * stride_vs
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    lo, mid_lo, mid_hi, hi = _kv_range(m0, q_len, k_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT,
                                       BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    dq = _dq_blocks(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, lo, mid_lo, offs_m, q_len, k_len,
                    left, right, qk_scale, D, MASK=True, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dq = _dq_blocks(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, mid_lo, mid_hi, offs_m, q_len,
                    k_len, left, right, qk_scale, D, MASK=False, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dq = _dq_blocks(dq, q, do, lse, delta, K_base, V_base, stride_ks, stride_vs, mid_hi, hi, offs_m, q_len, k_len,
                    left, right, qk_scale, D, MASK=True, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT, PREC=PREC,
                                BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------

# Under the interpreter numpy runs every tile and the cost is per tile, not per element:
# blocks as large as the test sequences allow (S = 37..300 still spans several blocks, so the
# boundary/interior split is exercised); BLOCK_M != BLOCK_N catches block-size mix-ups.
_INTERPRET_FWD = dict(BLOCK_M=64, BLOCK_N=32)
_INTERPRET_DKDV = dict(BLOCK_M=32, BLOCK_N=64)
_INTERPRET_DQ = dict(BLOCK_M=64, BLOCK_N=32)
_KEY = ["SEQ_KEY_Q", "SEQ_KEY_K", "BLOCK_D", "PACKED", "HAS_LEFT", "HAS_RIGHT", "PREC", "GROUP"]


# GPU configs (BLOCK_M, BLOCK_N, num_warps, num_stages); the first of each list is the fixed
# choice when GRIT_AUTOTUNE=0 (every key of the autotuner compiles every config:
# seconds per new shape/mode, which GPU test runs can skip). Checked by compiling for sm_90
# (bf16, D = 128) and reading the register use: first entries are those without spills.
_GPU_CONFIGS = {
    # 128-row Q tiles need 8 warps (2 warpgroups) to hold the fp32 accumulator unspilled.
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    # Holds dK and dV (2 x BLOCK_N x D fp32) and streams Q in small blocks: one loop whose
    # boundary blocks branch into the mask (three specialised loops as in the forward spilled
    # at every config, up to 1.6 KB of stack per thread).
    "dkdv": [(32, 128, 8, 3), (32, 64, 8, 3), (64, 128, 8, 3)],
    # Holds dQ and streams K, V.
    "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
}
# fp32 ("ieee" dots run on CUDA cores, fp32 stays fp32): the largest tiles that compile
# without spills at D = 128 on sm_90 (ptxas -v). The earlier (64, 32, 4, 2) tiles spilled
# 4.6 KB (forward) to 44 KB (dQ) per thread; at 4 warps even 16-row tiles spill.
_GPU_CONFIGS_FP32 = {"fwd": [(16, 16, 8, 2)], "dkdv": [(32, 32, 8, 2)], "dq": [(16, 16, 8, 2)]}
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


@functools.lru_cache(maxsize=None)
def _tuned(which: str, autotune: bool, fp32: bool):
    """The kernel with its GPU configs, built on first use (never at import)."""
    shapes = (_GPU_CONFIGS_FP32 if fp32 else _GPU_CONFIGS)[which]
    shapes = shapes if autotune else shapes[:1]
    configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=st) for m, n, w, st in shapes]
    return triton.autotune(configs, key=_KEY)(_KERNELS[which])


def _interpret() -> bool:
    from .. import _backend

    return _backend.triton_interpret()


def _launch(which, kernel, fixed, grid_of, args, **constexprs):
    if _interpret():
        kernel[grid_of(fixed)](*args, **constexprs, **fixed)
    else:
        _tuned(which, autotune_enabled(), constexprs["PREC"] == "ieee")[grid_of](*args, **constexprs)


def _strides3(t, packed):
    """(stride_b, stride_s, stride_h) of a (B, S, H, D) or packed (T, H, D) tensor."""
    if packed:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _geometry(q, k, cu_q, max_q, max_k):
    packed = cu_q is not None
    if packed:
        B = cu_q.numel() - 1
        Sq, Sk = max_q, max_k
        lse_strides = (0, q.shape[0])                     # lse (Hq, Tq)
    else:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        lse_strides = (q.shape[2] * Sq, Sq)               # lse (B, Hq, Sq)
    return packed, B, Sq, Sk, lse_strides


def _flags(q, causal, window):
    left, right = window
    if causal:
        right = 0
    return dict(HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, PREC=precision(q.dtype)), max(left, 0), max(right, 0)


# Grid dimension z (the batch) holds at most 65535 programs: longer batches are launched in
# slices of this many sequences (padded tensors are sliced on dim 0, packed ones keep their
# rows and pass the slice of cu_seqlens, whose offsets are absolute).
MAX_GRID_BATCH = 65535


def _batch_slices(B: int, packed: bool, cu_q, cu_k, dummy):
    """-> [(view of a padded tensor for the slice, (cu_q, cu_k) args, sequences)] over B."""
    out = []
    for b0 in range(0, B, MAX_GRID_BATCH):
        n = min(MAX_GRID_BATCH, B - b0)
        if packed:
            out.append((lambda t: t, (cu_q[b0:b0 + n + 1], cu_k[b0:b0 + n + 1]), n))
        else:
            out.append((lambda t, b0=b0, n=n: t[b0:b0 + n], (dummy, dummy), n))
    return out


def forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, window, scale: float):
    """-> (out (q's shape, contiguous, q's dtype), lse fp32 (B, Hq, Sq) or (Hq, Tq))."""
    packed, B, Sq, Sk, (slb, slh) = _geometry(q, k, cu_q, max_q, max_k)
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (Hq, q.shape[0]) if packed else (B, Hq, Sq)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if B == 0 or Sq == 0 or Hq == 0:
        return out, lse
    flags, left, right = _flags(q, causal, window)
    # lse stands in for cu_seqlens in the padded layout
    for part, (cq, ck), n in _batch_slices(B, packed, cu_q, cu_k, lse):
        args = (part(q), part(k), part(v), part(out), part(lse), cq, ck,
                *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(out, packed),
                slb, slh, Sq, Sk, Hq // Hkv, D, scale * LOG2E.value, left, right,
                triton.next_power_of_2(Sq), triton.next_power_of_2(max(Sk, 1)))
        _launch("fwd", _attn_fwd_kernel, _INTERPRET_FWD,
                lambda meta, n=n: (triton.cdiv(Sq, meta["BLOCK_M"]), Hq, n), args,
                PACKED=packed, BLOCK_D=max(16, triton.next_power_of_2(D)), **flags)
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, window,
             scale: float):
    """-> (dq, dk, dv), contiguous, shaped and typed like q, k, v."""
    packed, B, Sq, Sk, (slb, slh) = _geometry(q, k, cu_q, max_q, max_k)
    Hq, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if B == 0 or Hq == 0 or (Sq == 0 and Sk == 0):
        return dq, dk, dv
    if Sq == 0:  # keys nobody looked at
        return dq, dk.zero_(), dv.zero_()
    flags, left, right = _flags(q, causal, window)
    BLOCK_D = max(16, triton.next_power_of_2(D))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block_m = 64 if not _interpret() else 32
    keys = (triton.next_power_of_2(Sq), triton.next_power_of_2(max(Sk, 1)))
    common = (Sq, Sk, Hq // Hkv, D, scale, scale * LOG2E.value, left, right, *keys)
    for part, (cq, ck), n in _batch_slices(B, packed, cu_q, cu_k, lse):
        q_, k_, v_, do_, lse_, delta_ = (part(t) for t in (q, k, v, dout, lse, delta))
        _bwd_preprocess_kernel[(triton.cdiv(Sq, block_m), Hq, n)](
            part(out), do_, part(dlse) if dlse is not None else lse_, delta_, cq,
            *_strides3(out, packed), *_strides3(dout, packed), slb, slh, Sq, D,
            PACKED=packed, HAS_DLSE=dlse is not None, BLOCK_M=block_m, BLOCK_D=BLOCK_D,
        )
        if Sk > 0:
            _launch("dkdv", _attn_bwd_dkdv_kernel, _INTERPRET_DKDV,
                    lambda meta, n=n: (triton.cdiv(Sk, meta["BLOCK_N"]), Hkv, n),
                    (q_, k_, v_, do_, lse_, delta_, part(dk), part(dv), cq, ck,
                     *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(dout, packed),
                     *_strides3(dk, packed), *_strides3(dv, packed), slb, slh, *common),
                    PACKED=packed, BLOCK_D=BLOCK_D, **flags)
        _launch("dq", _attn_bwd_dq_kernel, _INTERPRET_DQ,
                lambda meta, n=n: (triton.cdiv(Sq, meta["BLOCK_M"]), Hq, n),
                (q_, k_, v_, do_, lse_, delta_, part(dq), cq, ck,
                 *_strides3(q, packed), *_strides3(k, packed), *_strides3(v, packed), *_strides3(dout, packed),
                 *_strides3(dq, packed), slb, slh, *common),
                PACKED=packed, BLOCK_D=BLOCK_D, **flags)
    return dq, dk, dv
