"""Attention over a KV cache in Triton: append kernel, split-KV attention kernel, combine kernel.

Napkin math (decode, Sq = 1, Hkv = 8, Dh = 128, bf16): each step reads the whole cache,
2 * L * Hkv * Dh * 2 bytes per row (32 KB per 1k tokens), and does 4 * L * Hq * Dh FLOPs: 4
FLOPs per byte for G = 4 query heads per KV head, hundreds of times below an H100's balance,
so decode is bandwidth-bound (goal: >= 70% of HBM bandwidth at L >= 4k) and the kernel's job
is to keep every SM streaming: the GQA group shares each K/V tile, and split-KV spreads one
sequence over the SMs. A prefill over a cache (Sq in the hundreds) is compute-bound like the
attention forward.

Same contract as grit_kernels/reference/attention_kvcache.py. Shapes: q (B, Sq, Hq, D), caches
(B, S_max, Hkv, D), cache_seqlens (B,) int32, G = Hq // Hkv query heads per KV head.

* ``_append_kv_kernel``: one program per new token (and block of KV heads) copies its k and v
  rows to ``cache[b, cache_seqlens[b] + s]``. It runs before the attention kernel, as its own
  launch, so the attention kernel only writes its outputs: autotuning may replay it safely.
* ``_attn_kernel``: Flash-Decoding. The GQA group is folded into the query rows: one program
  owns M = Sq * G rows (query i, head g of the group) of one KV head, so each K/V tile is
  read once for the whole group, and for decode (Sq = 1, G = 4) the 16-row tensor-core tile
  is not mostly padding. The KV range a block of rows may see (the row's length from
  cache_seqlens, the causal diagonal, the window) is split into NUM_SPLITS pieces of whole
  tiles, one program each, so a single sequence still spreads over the SMs. Each piece is
  split per row at run time from cache_seqlens: no host sync, and rows of very different
  lengths in one batch each get all the splits.
  With one split the kernel writes the normalised output directly; with several it writes
  fp32 partial outputs and their log2-sum-exp.
* ``_combine_kernel``: merges the partials of each row, weights exp2(lse_s - max lse).

Online softmax in fp32 with exp2 (scale folded with log2(e)). Keys past ``Sk_b`` are never
loaded: every load is masked to ``n < end <= Sk_b``, and ``Sk_b`` itself is clamped to the
row's capacity S_max, so a corrupt length can give a wrong answer but never a read or write
outside the row.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import _backend
from ._common import (LOG2E, autotune_enabled, key_range, kv_tiles_fit, on_gpu, precision, sm_count, softmax_step,
                      splat, window_mask)


@triton.jit(do_not_specialize=["Sq", "S_max"])
def _append_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, seqlens_ptr,
    Sq, Hkv, D, S_max,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    b = (tok // Sq).to(tl.int64)
    s = (tok % Sq).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    pos = tl.load(seqlens_ptr + b).to(tl.int64) + s
    # 0 <= pos < S_max is checked on the host; the mask keeps a bad length (one the host check
    # did not see, e.g. changed behind the version counter) from writing outside the row.
    pos_v = splat(pos, BLOCK_H)
    pos_ok = (pos_v >= 0) & (pos_v < S_max)
    ok = ((h < Hkv) & pos_ok)[:, None] & (d < D)[None, :]
    hh = h.to(tl.int64)[:, None]
    kx = tl.load(k_ptr + b * stride_kb + s * stride_ks + hh * stride_kh + d[None, :], mask=ok)
    vx = tl.load(v_ptr + b * stride_vb + s * stride_vs + hh * stride_vh + d[None, :], mask=ok)
    tl.store(kc_ptr + b * stride_kcb + pos * stride_kcs + hh * stride_kch + d[None, :], kx, mask=ok)
    tl.store(vc_ptr + b * stride_vcb + pos * stride_vcs + hh * stride_vch + d[None, :], vx, mask=ok)


@triton.jit(do_not_specialize=["B", "Sq_new", "S_max", "NUM_SPLITS", "window_left", "window_right", "TUNE_KEY"])
def _attn_kernel(
    q_ptr, kc_ptr, vc_ptr, seqlens_ptr, out_ptr, opart_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    B, Sq, Sq_new, Hkv, D, S_max, NUM_SPLITS, qk_scale, window_left, window_right, TUNE_KEY,
    GROUP: tl.constexpr, CAUSAL: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    SPLIT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Row blocks of one (b, KV head) are adjacent programs: a long prefill's blocks share K/V in L2.
    M_BLOCKS = tl.cdiv(Sq * GROUP, BLOCK_M)
    mblk = tl.program_id(0) % M_BLOCKS
    bh = tl.program_id(0) // M_BLOCKS
    split = tl.program_id(1)
    b = bh // Hkv
    hkv = bh % Hkv
    M = Sq * GROUP

    rows = mblk * BLOCK_M + tl.arange(0, BLOCK_M)  # row r = (query i, head g of the group)
    row_ok = rows < M
    qi = rows // GROUP
    head = hkv * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    # Sk_b: keys this row attends to. Clamped to the row's capacity [0, S_max) so that no
    # length, valid or not, makes the loads below leave the row (the host check that gives
    # the clear error can be bypassed, e.g. lengths written through .data or under capture).
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0) + Sq_new, S_max)
    off = seqlen - Sq  # query i's diagonal key is i + off (bottom-right aligned)

    # Keys any row of this block may see: [lo, hi).
    i_lo = (mblk * BLOCK_M) // GROUP
    i_hi = tl.minimum((mblk * BLOCK_M + BLOCK_M - 1) // GROUP, Sq - 1)
    if CAUSAL:  # right = 0 as a compile-time constant: one live register fewer in the loop
        right = 0
    else:
        right = window_right
    lo, hi = key_range(i_lo, i_hi, off, seqlen, window_left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
    hi = tl.maximum(hi, lo)
    # This program's share: whole tiles, so every split but the last reads full tiles.
    n_tiles = tl.cdiv(hi - lo, BLOCK_N)
    per_split = tl.cdiv(n_tiles, NUM_SPLITS)
    start = lo + split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, hi)

    b64 = b.to(tl.int64)
    q_off = (b64 * stride_qb + qi.to(tl.int64)[:, None] * stride_qs + head.to(tl.int64)[:, None] * stride_qh
             + d[None, :])
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = kc_ptr + b64 * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = vc_ptr + b64 * stride_vb + hkv.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        n64 = n.to(tl.int64)[:, None]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + n64 * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        # Keys: n < end <= seqlen already; rows past M are never stored.
        seen = window_mask(n_ok[None, :], qi, n, off, window_left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)
        qk = tl.where(seen, qk, float("-inf"))
        p, alpha, m_new, l_i = softmax_step(m_i, l_i, qk, MAY_BE_EMPTY=True)
        v = tl.load(v_base + n64 * stride_vs + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new  # after the dot: updating it before costs 8 B more stack (ptxas, sm_90)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: 0, not 0/0
    if SPLIT:
        # Partials indexed [split, b, hkv, row]: R = B * Hkv * M rows per split.
        R = B * Hkv * M
        flat = split.to(tl.int64) * R + bh.to(tl.int64) * M + rows
        tl.store(opart_ptr + flat[:, None] * D + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + flat, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf")),
                 mask=row_ok)
    else:
        o_off = (b64 * stride_ob + qi.to(tl.int64)[:, None] * stride_os + head.to(tl.int64)[:, None] * stride_oh
                 + d[None, :])
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["R", "M", "NUM_SPLITS"])
def _combine_kernel(
    opart_ptr, lse_ptr, out_ptr,
    stride_ob, stride_os, stride_oh,
    R, M, Hkv, D, NUM_SPLITS,
    GROUP: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # flat (b, hkv, row), the partials' row index
    s = tl.arange(0, BLOCK_S)
    lse = tl.load(lse_ptr + s.to(tl.int64) * R + r, mask=s < NUM_SPLITS, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # every split empty: weights 0, output 0
    total = tl.sum(tl.exp2(lse - mx), 0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros((BLOCK_D,), tl.float32)
    # Chunks of splits keep the (splits, D) tile small when there are many splits.
    for s0 in range(0, NUM_SPLITS, CHUNK):
        sc = s0 + tl.arange(0, CHUNK)
        sc_ok = sc < NUM_SPLITS
        w = tl.exp2(tl.load(lse_ptr + sc.to(tl.int64) * R + r, mask=sc_ok, other=float("-inf")) - mx)
        o = tl.load(opart_ptr + (sc.to(tl.int64) * R + r)[:, None] * D + d[None, :],
                    mask=sc_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(w[:, None] * o, 0)
    acc = acc / tl.where(total > 0, total, 1.0)
    row = r % M
    bh = r // M
    b = bh // Hkv
    head = (bh % Hkv) * GROUP + row % GROUP  # out is (B, Sq, Hq, D), Hq = Hkv * GROUP
    qi = row // GROUP
    tl.store(out_ptr + b * stride_ob + qi * stride_os + head * stride_oh + d, acc.to(out_ptr.dtype.element_ty),
             mask=d_ok)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal: bool, window: tuple[int, int],
            scale: float) -> torch.Tensor:
    """The triton backend of ``attention_with_kvcache``: append (its own launch, so the
    autotuned attention kernel only writes its outputs and may be replayed), then attend."""
    cache_seqlens = cache_seqlens.contiguous()  # the kernels index it densely (a view may be strided)
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
    return attention(q, k_cache, v_cache, cache_seqlens, q.shape[1] if k is not None else 0,
                     causal=causal, window=window, softmax_scale=scale)


def append_kv(k_cache, v_cache, cache_seqlens, k, v) -> None:
    """Write k/v (B, Sq, Hkv, D) into k_cache/v_cache (B, S_max, Hkv, D) at cache_seqlens[b]."""
    B, Sq, Hkv, D = k.shape
    if B == 0 or Sq == 0 or Hkv == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(Hkv), max(1, 4096 // block_d))
    _append_kv_kernel[(B * Sq, triton.cdiv(Hkv, block_h))](
        k, v, k_cache, v_cache, cache_seqlens,
        Sq, Hkv, D, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        BLOCK_H=block_h, BLOCK_D=block_d,
    )


# Fixed config under the interpreter (numpy underneath: small tiles are fastest).
_INTERPRET_BLOCK_N = 16


def _decode_configs():
    """Few rows (M = Sq * G <= 64, BLOCK_M set by the launcher): memory-bound, tune the KV tile.
    The first is the pinned choice under GRIT_AUTOTUNE=0."""
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
            for n in (64, 32, 128) for w in (4, 8) for st in (3, 2, 4)]


def _prefill_configs():
    """Many rows (prefill over a cache): compute-bound, tune the row block too."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m in (64, 128) for n in (64, 32) for w in (4, 8) for st in (2, 3)]


def _fitting(configs, named_args, *, first_only: bool, **meta):
    """Early prune: drop the configs whose K/V tiles cannot fit shared memory (fp32 at large
    tiles and deep pipelines) before any is compiled; ``first_only``: keep the first of them."""
    elem = named_args["kc_ptr"].element_size()
    fit = [c for c in configs
           if kv_tiles_fit(c.kwargs.get("BLOCK_M", meta.get("BLOCK_M")), c.kwargs["BLOCK_N"], meta["BLOCK_D"],
                           c.num_stages, elem)]
    return fit[:1] if first_only else fit


@functools.lru_cache(maxsize=None)
def _tuned_attn_kernel(prefill: bool, autotune: bool):
    """The attention kernel under triton.autotune, built on first GPU use (nothing at import).

    Safe to replay: the kernel writes only out/opart/lse, never the caches.
    TUNE_KEY buckets (rows, splits, head dim, log2 of the cache capacity), so a new decode
    length does not re-tune; the mask mode, GQA group and precision are keys of their own (a
    window or a causal mask changes which tiles are loaded, so its best tile may differ).
    With ``autotune`` off, the first config that fits (no benchmarking, one compile).
    """
    configs = _prefill_configs() if prefill else _decode_configs()
    keys = ["TUNE_KEY", "GROUP", "CAUSAL", "HAS_LEFT", "HAS_RIGHT", "PREC"]
    prune = functools.partial(_fitting, first_only=not autotune)
    return triton.autotune(configs=configs, key=keys, prune_configs_by={"early_config_prune": prune})(_attn_kernel)


def num_splits_for(batch_heads: int, m_blocks: int, s_max: int, sms: int, min_keys: int = 128) -> int:
    """How many programs share one row's KV range.

    Enough programs for about two per SM when batch * KV heads * row blocks falls short
    (a single decoded sequence has only Hkv = 8 of them), but no fewer than ``min_keys``
    keys of cache capacity per split, below which the combine costs more than it saves.
    The capacity S_max stands in for the lengths, which only the device knows; the kernel
    divides each row's actual range, so short rows leave some splits empty (cheap exits).
    """
    base = batch_heads * m_blocks
    if base >= sms:
        return 1
    want = triton.cdiv(2 * sms, base)
    return max(1, min(want, triton.cdiv(s_max, min_keys), 128))


def attention(q, k_cache, v_cache, cache_seqlens, Sq_new: int, *, causal: bool, window: tuple[int, int],
              softmax_scale: float, num_splits: int | None = None) -> torch.Tensor:
    """q (B, Sq, Hq, D) over the caches (after any append) -> (B, Sq, Hq, D) in q's dtype.

    Row b attends to its first ``cache_seqlens[b] + Sq_new`` cache positions. ``num_splits``
    overrides the heuristic (tests use it to exercise both the direct and combine paths).
    """
    B, Sq, Hq, D = q.shape
    S_max, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    out = torch.empty((B, Sq, Hq, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    M = Sq * group
    # Decode rows: the smallest tensor-core tile that holds them. Prefill (M > 64): 64 here,
    # for the split heuristic; on a GPU the autotuner picks 64 or 128.
    block_m = 16 if M <= 16 else (32 if M <= 32 else 64)
    m_blocks = triton.cdiv(M, block_m)
    interpret = _backend.triton_interpret() or not on_gpu(q)
    if num_splits is None:
        if interpret:  # pretend to be a small GPU so that CPU tests split small caches too
            num_splits = num_splits_for(B * Hkv, m_blocks, S_max, sms=16, min_keys=16)
        else:
            num_splits = num_splits_for(B * Hkv, m_blocks, S_max, sm_count(q.device))
    split = num_splits > 1
    block_d = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16
    left, right = window
    if split:
        R = B * Hkv * M
        opart = torch.empty((num_splits, R, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((num_splits, R), dtype=torch.float32, device=q.device)
    else:
        opart = lse = out  # unused pointers
    args = (
        q, k_cache, v_cache, cache_seqlens, out, opart, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        B, Sq, Sq_new, Hkv, D, S_max, num_splits, softmax_scale * LOG2E.value,
        max(left, 0), 0 if causal else max(right, 0),
    )
    meta = dict(
        GROUP=group, CAUSAL=causal, HAS_LEFT=left >= 0, HAS_RIGHT=causal or right >= 0,  # causal: right = 0
        SPLIT=split, PREC=precision(q.dtype), BLOCK_D=block_d,
    )
    if interpret:
        grid = (m_blocks * B * Hkv, num_splits)  # dim 0 allows 2**31 - 1 programs, dims 1-2 only 65535
        _attn_kernel[grid](*args, 0, **meta, BLOCK_M=block_m, BLOCK_N=_INTERPRET_BLOCK_N)
    else:
        prefill = M > 64
        rows_bucket = triton.next_power_of_2(M)
        tune_key = ((rows_bucket * 256 + min(num_splits, 128)) * 512 + block_d) * 64 + int(math.log2(max(S_max, 1)))
        if prefill:  # the autotuner picks BLOCK_M: the grid follows it
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * B * Hkv, num_splits)
        else:
            grid = (m_blocks * B * Hkv, num_splits)
            meta["BLOCK_M"] = block_m
        _tuned_attn_kernel(prefill, autotune_enabled())[grid](*args, tune_key, **meta)
    if split:
        block_s = triton.next_power_of_2(num_splits)
        _combine_kernel[(R,)](
            opart, lse, out, out.stride(0), out.stride(1), out.stride(2), R, M, Hkv, D, num_splits,
            GROUP=group, BLOCK_S=block_s, CHUNK=min(block_s, 16), BLOCK_D=block_d,
        )
    return out
