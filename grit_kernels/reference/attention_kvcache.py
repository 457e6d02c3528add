"""Attention over a KV cache with in-place append, in plain PyTorch: the oracle and the CPU path.

Written for clarity, not speed: an explicit boolean mask per batch row, softmax in fp32 (or
fp64 for test oracles), GQA by repeating K/V heads. Conventions are flash-attn's
(``flash_attn_with_kvcache``):

* ``k``/``v`` given: the Sq new tokens are written at ``cache[b, cache_seqlens[b] + s]`` and
  row b attends to its first ``Sk_b = cache_seqlens[b] + Sq`` cache positions.
  ``k``/``v`` absent: row b attends to its first ``Sk_b = cache_seqlens[b]`` positions.
* The causal diagonal is bottom-right aligned: with ``off_b = Sk_b - Sq``, query i sees key
  j iff ``j <= i + off_b``. With Sq = 4 new tokens on a cache of 3 (Sk = 7, off = 3)::

        key j:    0 1 2 3 4 5 6
        query 0:  x x x x . . .
        query 1:  x x x x x . .
        query 2:  x x x x x x .
        query 3:  x x x x x x x

  so the cached prefix (whatever wrote it: a causal prefill or a bidirectional embedding
  pass) is fully visible to every new query.
* ``window=(left, right)`` is inclusive, -1 unbounded: ``j >= i + off_b - left`` and, only
  without ``causal``, ``j <= i + off_b + right`` (``causal`` means right = 0).
* A query that sees no key (possible only without ``k``/``v``, e.g. an empty cache row)
  gets zeros, never NaN.
"""

from __future__ import annotations

import math

import torch


def attention_mask(Sq: int, Sk: int, *, causal: bool, window: tuple[int, int], device=None) -> torch.Tensor:
    """(Sq, Sk) bool, True where query i may attend to key j (diagonal bottom-right aligned)."""
    left, right = window
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    diag = i + (Sk - Sq)  # the key aligned with query i
    visible = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if causal:
        visible &= j <= diag
    elif right >= 0:
        visible &= j <= diag + right
    if left >= 0:
        visible &= j >= diag - left
    return visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    seqlens_k: torch.Tensor | list[int] | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Padded attention with per-row key lengths, by an explicit mask.

    q (B, Sq, Hq, D), k/v (B, Sk_max, Hkv, D), ``seqlens_k`` (B,) keys of each row (default
    all Sk_max; keys past it are never looked at). Returns (B, Sq, Hq, D) in q's dtype.

    ``upcast=True``: everything in fp32 (fp64 when the inputs are fp64, as for an oracle).
    ``upcast=False``: flash-attn's ``attention_ref(upcast=False)``, the low-precision
    reference of the tolerance rule: QK^T and PV in the inputs' dtype, softmax in fp32,
    P rounded to the inputs' dtype before PV.
    """
    B, Sq, Hq, D = q.shape
    Sk_max, Hkv = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    if seqlens_k is None:
        seqlens_k = [Sk_max] * B
    elif isinstance(seqlens_k, torch.Tensor):
        seqlens_k = seqlens_k.tolist()
    group = Hq // Hkv
    wide = torch.promote_types(q.dtype, torch.float32)  # softmax precision
    mm = wide if upcast else q.dtype  # matmul precision
    out = torch.zeros(B, Sq, Hq, D, dtype=wide, device=q.device)
    for b in range(B):
        Sk = int(seqlens_k[b])
        if Sk == 0 or Sq == 0:
            continue
        qb = q[b].to(mm).transpose(0, 1)  # (Hq, Sq, D)
        kb = k[b, :Sk].to(mm).repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Sk, D)
        vb = v[b, :Sk].to(mm).repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qb @ kb.transpose(1, 2)).to(wide) * scale
        visible = attention_mask(Sq, Sk, causal=causal, window=window, device=q.device)
        scores = scores.masked_fill(~visible, float("-inf"))
        p = torch.softmax(scores, dim=-1)
        p = torch.nan_to_num(p, nan=0.0)  # queries that see no key: 0/0 -> zeros
        out[b] = (p.to(mm) @ vb).to(wide).transpose(0, 1)
    return out.to(q.dtype)


def append_kv(k_cache, v_cache, cache_seqlens, k, v) -> None:
    """Write k/v (B, Sq, Hkv, D) into the caches (B, S_max, Hkv, D) at cache_seqlens[b], in place."""
    Sq = k.shape[1]
    for b, start in enumerate(cache_seqlens.tolist()):
        k_cache[b, start:start + Sq] = k[b]
        v_cache[b, start:start + Sq] = v[b]


def attention_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, k=None, v=None, *, causal=True, window=(-1, -1), softmax_scale=None,
) -> torch.Tensor:
    """Append k/v in place (when given), then attend; returns (B, Sq, Hq, D) in q's dtype.

    Inputs are assumed valid (grit_kernels.ops.attention_kvcache checks them).
    ``cache_seqlens`` is not advanced.
    """
    Sq = q.shape[1]
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
        seqlens_k = (cache_seqlens.to(torch.int64) + Sq).tolist()
    else:
        seqlens_k = cache_seqlens.tolist()
    return attention_ref(q, k_cache, v_cache, causal=causal, window=window, softmax_scale=softmax_scale,
                         seqlens_k=seqlens_k)
