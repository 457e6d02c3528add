"""Attention over a KV cache with in-place append: validation, backend dispatch, torch.library.

    attention_with_kvcache(q_BSHD, k_cache_BLHD, v_cache_BLHD, cache_seqlens_B,
                           k_BSHD=None, v_BSHD=None, *, causal=True, window=(-1, -1),
                           softmax_scale=None)                                  -> (B, Sq, Hq, Dh)

Shapes: B batch, Sq new tokens, L_max cache capacity, Hq query heads, Hkv key/value heads,
Dh head dim.

Backends (grit_kernels/_backend.py), each a module with the same ``forward``: ``triton``
(grit_kernels/triton/attention_kvcache.py: append kernel, split-KV Flash-Decoding kernel,
logsumexp combine), ``cpu`` (grit_kernels/cpu/attention_kvcache.py, PyTorch's fused CPU
kernel), ``reference`` when forced. There is no csrc kernel for this op.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from . import _checks, _dispatch

BACKENDS = _backend.Table("attention_kvcache", ("reference", "cpu", "triton"))
MAX_HEAD_DIM = 256  # flash-attn's limit; the Triton kernel keeps a (rows, D) tile on chip


def attention_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Append new keys/values to a KV cache in place, then attend to the cache (flash-attn's
    ``flash_attn_with_kvcache`` conventions).

    Arguments:
        q: (B, Sq, Hq, Dh) queries of the Sq new tokens.
        k_cache, v_cache: (B, L_max, Hkv, Dh), same dtype as q. Written in place when k/v are
            given. Any strides, except that the last dim must be contiguous.
        cache_seqlens: (B,) int32, tokens already in each row's cache. Rows may differ.
            NOT advanced by this call (as in flash-attn): the caller adds Sq afterwards.
        k, v: (B, Sq, Hkv, Dh) or both None. When given they are written to
            ``cache[b, cache_seqlens[b] : cache_seqlens[b] + Sq]`` and row b attends to
            ``Sk_b = cache_seqlens[b] + Sq`` keys; without them to ``Sk_b = cache_seqlens[b]``.
            Nothing at or past ``Sk_b`` is read. Requires ``cache_seqlens[b] + Sq <= L_max``.
        causal: bottom-right aligned causal mask: query i sees key j iff
            ``j <= i + Sk_b - Sq``. Decode of Sq = 2 tokens on a cache of 3 (Sk = 5)::

                key j:   0 1 2 3 4
                query 0: x x x x .
                query 1: x x x x x

            The cached prefix is visible to every query, so a cache filled by a
            bidirectional embedding pass (GritLM's doc caching) is then decoded causally.
        window: (left, right) inclusive sliding window, -1 = unbounded:
            ``j >= i + Sk_b - Sq - left`` and, without causal, ``j <= i + Sk_b - Sq + right``
            (causal means right = 0; a right value is then ignored).
        softmax_scale: defaults to 1 / sqrt(Dh).

    Returns: (B, Sq, Hq, Dh) in q's dtype. Queries that see no key (only possible without k/v,
    e.g. an empty cache row) get zeros.

    Inference only: not differentiable (no backward is registered; calling backward through
    it raises). Validation happens before anything is written: a rejected call leaves the
    caches untouched. The "cache too small" check reads ``cache_seqlens`` on the host, which
    on CUDA is one small device-to-host copy (a sync); on CUDA it is skipped when the same
    ``cache_seqlens`` tensor was already checked and not modified since (the other layers
    of a decode step), when its writer vouched for the lengths (``lengths_fit``: a KV cache
    that knows them on the host, so a decode step never syncs) and while a CUDA graph is
    being captured (a sync is illegal there).
    Whatever the lengths say, the kernels never read or write outside ``[0, L_max)`` of a
    row. The caches must not alias themselves or each other (no expanded views).
    """
    left, right = _validate(q, k_cache, v_cache, cache_seqlens, k, v, causal, window, softmax_scale)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return _dispatch.call(_attention_with_kvcache_op, q, k_cache, v_cache, cache_seqlens, k, v, bool(causal), left,
                          right, scale)


def _validate(q, k_cache, v_cache, cache_seqlens, k, v, causal, window, softmax_scale) -> tuple[int, int]:
    """Shapes, dtypes, devices, strides and scalar arguments (no tensor values read)."""
    _checks.check_tensor("q", q, ndim=4, dtypes=_checks.FLOAT_DTYPES)
    B, Sq, Hq, D = q.shape
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim D = {D} unsupported, expected 1 <= D <= {MAX_HEAD_DIM}")
    device = q.device
    _checks.check_tensor("k_cache", k_cache, ndim=4, dtypes=(q.dtype,), device=device)
    Bc, S_max, Hkv, Dc = k_cache.shape
    if Bc != B:
        raise ValueError(f"k_cache: expected batch {B} like q, got shape {tuple(k_cache.shape)}")
    if Dc != D:
        raise ValueError(f"k_cache: head dim {Dc} does not match q's D = {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"k_cache: Hkv = {Hkv} KV heads must divide q's Hq = {Hq} query heads")
    _checks.check_tensor("v_cache", v_cache, ndim=4, dtypes=(q.dtype,), shape=tuple(k_cache.shape), device=device)
    _checks.check_tensor("cache_seqlens", cache_seqlens, dtypes=(torch.int32,), shape=(B,), device=device)
    if (k is None) != (v is None):
        missing = "v" if v is None else "k"
        raise ValueError(f"{missing}: k and v are appended together; pass both or neither")
    if k is not None:
        _checks.check_tensor("k", k, ndim=4, dtypes=(q.dtype,), shape=(B, Sq, Hkv, D), device=device)
        _checks.check_tensor("v", v, ndim=4, dtypes=(q.dtype,), shape=(B, Sq, Hkv, D), device=device)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if t is not None and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dim (D) must be contiguous (stride 1), got strides {t.stride()}")
    if k is not None:
        _checks.check_no_overlap(k_cache=k_cache, v_cache=v_cache)
    return _checks.check_mask_args(causal, window, softmax_scale)


def _check_values(cache_seqlens: torch.Tensor, S_max: int, Sq_new: int) -> None:
    """0 <= cache_seqlens[b] and cache_seqlens[b] + Sq_new <= S_max, before anything is written.

    Reads the (B,) int32 values on the host through ``_checks.read_once``: every call for CPU
    tensors (no sync to save, and a change through ``.numpy()`` must be seen), once per
    unchanged CUDA tensor (the other layers of a decode step pay no sync; ``seqlens += 1``
    bumps the version and re-reads). Skipped under fake tensors and during CUDA graph
    capture, where values cannot be read. Changes that bypass the version counter
    (``.data``) can skip this check, but not memory safety: the kernels clamp every read and
    write to the capacity.
    """
    if cache_seqlens.numel() == 0 or _checks._is_fake(cache_seqlens):
        return

    def check() -> bool:
        values = cache_seqlens.tolist()  # B ints: one copy, then plain Python (B is small)
        if min(values) < 0:
            raise ValueError(f"cache_seqlens: expected non-negative lengths, got {values[:16]}")
        if max(values) + Sq_new > S_max:
            b = next(i for i, n in enumerate(values) if n + Sq_new > S_max)
            what = f"cache_seqlens[{b}] = {values[b]}"
            if Sq_new:
                what = f"cache_seqlens[{b}] + Sq = {values[b]} + {Sq_new}"
            raise ValueError(f"cache_seqlens: {what} exceeds the cache capacity S_max = {S_max} (k_cache too small)")
        return True

    _checks.read_once(cache_seqlens, _check_key(S_max, Sq_new), check)


def _check_key(S_max: int, Sq_new: int) -> tuple:
    return ("cache_seqlens", S_max, Sq_new)


def lengths_fit(cache_seqlens: torch.Tensor, S_max: int, Sq_new: int) -> None:
    """The caller's word that ``0 <= cache_seqlens[b]`` and ``cache_seqlens[b] + Sq_new <=
    S_max`` for the tensor's current values (it wrote them from lengths it knows on the
    host, e.g. a generate loop's cache): the next call's check reads nothing, so a decode
    step costs no host sync. A wrong word cannot reach memory (the kernels clamp every
    access to the capacity); it only loses the clear error. A no-op while torch.compile
    traces (the memo is host state; compiled code runs the op's own check, or none under
    CUDA graph capture)."""
    if torch.compiler.is_compiling():
        return
    _checks.vouch(cache_seqlens, _check_key(S_max, Sq_new), True)


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@_dispatch.custom_op("grit::attention_with_kvcache", mutates_args=("k_cache", "v_cache"))
def _attention_with_kvcache_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
) -> torch.Tensor:
    """(B, Sq, Hq, D) output; k_cache/v_cache get k/v appended in place (when given)."""
    _check_values(cache_seqlens, k_cache.shape[1], q.shape[1] if k is not None else 0)
    impl = BACKENDS.select(q.device.type)
    return impl.forward(q, k_cache, v_cache, cache_seqlens, k, v, causal, (window_left, window_right),
                        softmax_scale)


@_attention_with_kvcache_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k, v, causal, window_left, window_right, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
