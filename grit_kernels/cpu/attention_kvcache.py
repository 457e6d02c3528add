"""Attention over a KV cache on CPU tensors: the cpu backend of ``attention_with_kvcache``.

    forward(q_BSHD, k_cache_BLHD, v_cache_BLHD, cache_seqlens_B, k_BSHD, v_BSHD, causal, window, scale)
        -> out (B, Sq, Hq, Dh); k/v (when given) appended to the caches in place first

Shapes: B batch, Sq new tokens, Hq query heads, Hkv key/value heads, Dh head dim, L_max
cache capacity. The append is one indexed write; the attention is PyTorch's fused CPU
kernel (grit_kernels/cpu/attention.py) over views of the caches when every row holds the
same number of keys, else one masked call over a zero-padded copy (below).
"""

from __future__ import annotations

import torch

from .._mask import visible
from .attention import _FLASH, _additive, _forward_padded


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal: bool, window: tuple[int, int],
            scale: float) -> torch.Tensor:
    """Append k/v (B, Sq, Hkv, Dh) at ``cache_seqlens[b]`` of each row (when given), then attend."""
    lengths = cache_seqlens.tolist()  # a CPU tensor: no sync
    if k is not None:
        append(k_cache, v_cache, cache_seqlens, k, v)
        lengths = [n + q.shape[1] for n in lengths]
    return _attend(q, k_cache, v_cache, lengths, causal, window, scale)


def append(k_cache, v_cache, cache_seqlens, k, v) -> None:
    """cache[b, cache_seqlens[b] + s] = new[b, s] for every row b and new token s, one write each."""
    B, Sq = k.shape[:2]
    if B == 0 or Sq == 0:
        return
    rows = torch.arange(B)[:, None]
    pos = cache_seqlens.to(torch.int64)[:, None] + torch.arange(Sq)  # (B, Sq)
    k_cache[rows, pos] = k
    v_cache[rows, pos] = v


def _attend(q, k_cache, v_cache, seqlens_k: list[int], causal: bool, window: tuple[int, int],
            scale: float) -> torch.Tensor:
    """q (B, Sq, Hq, Dh), caches (B, L_max, Hkv, Dh), row b attending to its first seqlens_k[b]
    keys (bottom-right aligned diagonal per row) -> (B, Sq, Hq, Dh) contiguous in q's dtype.

    Rows of equal length (decode of one sequence, or a batch in lockstep): one call on views of
    the caches, no copy. Rows of different lengths: one call over the longest row with a
    (B, 1, Sq, L) mask, on a copy of the caches' first L positions in which everything past a
    row's length is zero (the kernel would multiply the garbage there by 0: NaN stays NaN).
    """
    Sq = q.shape[1]
    L = max(seqlens_k, default=0)
    if Sq == 1 and q.numel():
        return _decode(q, k_cache, v_cache, seqlens_k, window[0], scale)
    if q.numel() == 0 or min(seqlens_k) == L:
        return _forward_padded(q, k_cache[:, :L], v_cache[:, :L], causal, window, scale)[0].contiguous()
    left, right = window
    if causal:
        right = 0
    # A copy with zeros past each row's keys. Clone + zero_ per row: torch.where with a
    # broadcast (B, L, 1, 1) condition took 5x longer (300 vs 61 us at B=2, L=257, K=8, D=128).
    k, v = k_cache[:, :L].clone(), v_cache[:, :L].clone()
    for b, n in enumerate(seqlens_k):
        if n < L:
            k[b, n:].zero_()
            v[b, n:].zero_()
    lengths = torch.tensor(seqlens_k, device=q.device)
    seen = visible(Sq, lengths[:, None, None], causal, (left, right), L=L, device=q.device)  # (B, Sq, L)
    # Query i of row b sees nothing iff Sk_b = 0 or i < Sq - Sk_b - right (see _plan): never
    # when k/v were appended (Sk_b >= Sq). Such a row attends to the zeroed keys instead of
    # none (the kernel's fully masked rows are not part of its contract), then is zeroed.
    shortest = min(seqlens_k)
    has_empty = shortest == 0 or (right >= 0 and shortest < Sq - right)
    if has_empty:
        empty = ~seen.any(dim=-1)  # (B, Sq)
        seen = seen | empty[..., None]
    out, _ = _FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                    attn_mask=_additive(seen[:, None], q.dtype), scale=scale)
    out = out.transpose(1, 2)
    if has_empty:
        out = out.masked_fill(empty[..., None, None], 0)
    return out.contiguous()


def _decode(q, k_cache, v_cache, seqlens_k: list[int], left: int, scale: float) -> torch.Tensor:
    """One new query per row (decode): row b's query sees keys ``[n - 1 - left, n)`` of its
    n = seqlens_k[b] (all n without a left window; a bottom-right query has no key past its
    own, whatever the mask mode), so each row is a call on a view of exactly those keys: no
    copy of the caches, no mask. Rows of one length share one call. A row with no key gets
    zeros. (Per row against the masked copy, one thread: B=4, L=120, Hq/Hkv=4/2, D=32: 105 vs
    130 us; B=16, L=1000, Hq/Hkv=8/4, D=64: 3.6 vs 15.6 ms.)"""
    def keys(n):
        return max(0, n - 1 - left) if left >= 0 else 0, n

    if min(seqlens_k) == max(seqlens_k):
        lo, n = keys(seqlens_k[0])
        if n == 0:
            return q.new_zeros(q.shape)
        return _one_query(q, k_cache[:, lo:n], v_cache[:, lo:n], scale)
    # Rows of different lengths: the kernel's (B, H, S, Dh) views are made once and the rows'
    # outputs joined by one cat, not a view and a copy per row (one thread, B=8 rows of 98 to
    # 170 keys, Hq/Hkv=8/4, Dh=32: 177 vs 222 us).
    Hq, D = q.shape[2:]
    qt, kt, vt = q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    outs = []
    for b, n in enumerate(seqlens_k):
        lo, n = keys(n)
        if n == 0:
            outs.append(q.new_zeros(1, Hq, 1, D))
        elif _gemv_pays(q, n - lo):
            outs.append(_gemv(q[b:b + 1], k_cache[b:b + 1, lo:n], v_cache[b:b + 1, lo:n], scale).transpose(1, 2))
        else:
            outs.append(_FLASH(qt[b:b + 1], kt[b:b + 1, :, lo:n], vt[b:b + 1, :, lo:n], 0.0, False, scale=scale)[0])
    return torch.cat(outs).transpose(1, 2)


# From this many key x head x dim elements on, fp32 decode attention as two batched GEMVs
# (scores, then weights x values, softmax in between) beats the fused flash kernel, whose
# blocking is built for many query rows (one thread, cache layout (B, L, Hkv, D) views:
# L=1000, Hq/Hkv=4/2, D=32: 48 vs 51 us; 8/4, D=64: 170 vs 244 us; L=4000, 32/8, D=128:
# 2.9 vs 7.1 ms; L=100, 4/2, D=32: 27 vs 20 us, below the threshold).
_GEMV_MIN = 1 << 17


def _gemv_pays(q, n: int) -> bool:
    """Whether q (R, 1, Hq, Dh) over n keys takes the GEMV pair rather than the fused kernel."""
    return q.dtype == torch.float32 and n * q.shape[2] * q.shape[3] >= _GEMV_MIN


def _one_query(q, k, v, scale: float) -> torch.Tensor:
    """q (R, 1, Hq, Dh) over every key of k, v (R, n, Hkv, Dh) views, n >= 1 -> (R, 1, Hq, Dh)."""
    if _gemv_pays(q, k.shape[1]):
        return _gemv(q, k, v, scale)
    o, _ = _FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False, scale=scale)
    return o.transpose(1, 2)


def _gemv(q, k, v, scale: float) -> torch.Tensor:
    """``_one_query`` as two batched GEMVs with the softmax in between (fp32)."""
    R, _, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(R, Hkv, Hq // Hkv, D)  # query head h reads KV head h // G
    p = torch.softmax(torch.matmul(qg, k.permute(0, 2, 3, 1)) * scale, dim=-1)  # (R, Hkv, G, n)
    return torch.matmul(p, v.transpose(1, 2)).reshape(R, 1, Hq, D)
