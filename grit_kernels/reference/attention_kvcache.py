"""Attention over a KV cache with in-place append, in plain PyTorch: the reference backend.

Conventions are flash-attn's (``flash_attn_with_kvcache``):

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

The attention itself is ``reference.attention.attention_ref`` with per-row key counts.
Shapes: B batch, Sq new tokens, Hq/Hkv heads, Dh head dim, L_max cache capacity.
"""

from __future__ import annotations

import torch

from .attention import attention_ref


def append_kv(k_cache, v_cache, cache_seqlens, k, v) -> None:
    """Write k/v (B, Sq, Hkv, Dh) into the caches (B, L_max, Hkv, Dh) at cache_seqlens[b], in place."""
    Sq = k.shape[1]
    for b, start in enumerate(cache_seqlens.tolist()):
        k_cache[b, start:start + Sq] = k[b]
        v_cache[b, start:start + Sq] = v[b]


def forward(q, k_cache, v_cache, cache_seqlens, k, v, causal, window, scale) -> torch.Tensor:
    """Append k/v in place (when given), then attend; returns (B, Sq, Hq, Dh) in q's dtype.

    Inputs are assumed valid (grit_kernels.ops.attention_kvcache checks them).
    ``cache_seqlens`` is not advanced.
    """
    Sq = q.shape[1]
    if k is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k, v)
        seqlens_k = (cache_seqlens.to(torch.int64) + Sq).tolist()
    else:
        seqlens_k = cache_seqlens.tolist()
    L = max(seqlens_k, default=0)
    out, _ = attention_ref(q, k_cache[:, :L], v_cache[:, :L], causal=causal, window=window, softmax_scale=scale,
                           seqlens_k=seqlens_k)
    return out.contiguous()
