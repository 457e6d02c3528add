"""Attention (FlashAttention-2), causal or bidirectional per call: validation, backend dispatch,
torch.library registration, autograd.

    attention(q_BSHD, k_BSHD, v_BSHD, *, causal, window, softmax_scale, return_lse)
    attention(q_THD, k_THD, v_THD, cu_seqlens_q=cu_B1, cu_seqlens_k=cu_B1, max_seqlen_q=.., ...)

Backends (grit_kernels/_backend.py), each a module with the same ``forward`` / ``backward``:
``triton`` (grit_kernels/triton/attention.py) for CUDA tensors, ``cpu``
(grit_kernels/cpu/attention.py, PyTorch's fused CPU kernel) for CPU tensors, ``reference``
when forced. There is no csrc kernel.
"""

from __future__ import annotations

import math

import torch

from .. import _backend
from . import _checks, _dispatch

BACKENDS = _backend.Table("attention", ("reference", "cpu", "triton"))
MAX_HEAD_DIM = 256


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
):
    """softmax(q kᵀ · softmax_scale + mask) v, with flash-attn's conventions.

    Padded layout:
        q: (B, Sq, Hq, Dh), k, v: (B, Sk, Hkv, Dh) -> out (B, Sq, Hq, Dh), lse (B, Hq, Sq) fp32
    Packed layout (sequences back to back, no padding):
        q: (Tq, Hq, Dh), k, v: (Tk, Hkv, Dh), cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets
        (sequence b is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]``; the last entry must equal T;
        cu_seqlens_k defaults to cu_seqlens_q) -> out (Tq, Hq, Dh), lse (Hq, Tq) fp32.
        ``max_seqlen_q/k`` (the longest sequence) are checked against cu_seqlens, which are read
        once per tensor and call (a host copy on CUDA).

    Hq must be a multiple of Hkv (GQA/MQA: query head h uses KV head ``h // (Hq // Hkv)``).
    Dh up to 256; q, k, v share a dtype (fp16, bf16, fp32) and have a contiguous last dim.

    Mask. With ``shift = Sk - Sq`` (per sequence), query i sees key j iff
    ``j <= i + shift + right`` and ``j >= i + shift - left`` for ``window=(left, right)``,
    inclusive, -1 = unbounded; ``causal=True`` sets right to 0. The diagonal is aligned to the
    bottom-right corner, as in flash-attn >= 2.1. causal, Sq=2, Sk=5::

        1 1 1 1 0
        1 1 1 1 1

    causal, Sq=5, Sk=2 (the first three rows see nothing: zero output, lse = -inf)::

        0 0
        0 0
        0 0
        1 0
        1 1

    ``causal=False, window=(-1, -1)`` is bidirectional (GRIT's embedding mode);
    ``window=(w, 0)`` is Mistral's sliding window of w + 1 keys.

    softmax_scale defaults to 1/sqrt(Dh). Differentiable in q, k and v (also through lse).

    Returns: out, or (out, lse) when ``return_lse``.
    """
    left, right = _validate(q, k, v, causal, window, softmax_scale, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k)
    if cu_seqlens_q is not None and cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens_q
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out, lse = _dispatch.call(
        _attention_op, q, k, v, cu_seqlens_q, cu_seqlens_k,
        -1 if max_seqlen_q is None else int(max_seqlen_q), -1 if max_seqlen_k is None else int(max_seqlen_k),
        bool(causal), left, right, scale,
    )
    return (out, lse) if return_lse else out


def _validate(q, k, v, causal, window, softmax_scale, cu_q, cu_k, max_q, max_k) -> tuple[int, int]:
    """Shapes, dtypes, devices and scalars (traceable checks; cu_seqlens values are read in the op)."""
    packed = cu_q is not None
    if cu_k is not None and not packed:
        raise ValueError("cu_seqlens_k: given without cu_seqlens_q; the packed layout needs cu_seqlens_q")
    ndim = 3 if packed else 4
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, S, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.check_tensor(name, t, dtypes=_checks.FLOAT_DTYPES)
        if t.dim() != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions {layout}, got shape {tuple(t.shape)}")
    _checks.check_same_device(q=q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q, got {t.dtype}")
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    D, Hq, Hkv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"k: expected head dim D = {D} like q, got shape {tuple(k.shape)}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"q: expected head dim 1 <= D <= {MAX_HEAD_DIM}, got {D}")
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"k: query heads Hq = {Hq} must be a multiple of key/value heads Hkv = {Hkv}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} like q, got shape {tuple(k.shape)}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name}: expected a contiguous last (head) dimension, got strides {t.stride()}")
    left, right = _checks.check_mask_args(causal, window, softmax_scale)
    if packed:
        _checks.check_tensor("cu_seqlens_q", cu_q, ndim=1, dtypes=(torch.int32,), device=q.device)
        if cu_q.numel() < 1:
            raise ValueError("cu_seqlens_q: expected B + 1 >= 1 offsets, got an empty tensor")
        if cu_k is not None:
            _checks.check_tensor("cu_seqlens_k", cu_k, ndim=1, dtypes=(torch.int32,), device=q.device)
            if cu_k.numel() != cu_q.numel():
                raise ValueError(f"cu_seqlens_k: expected B + 1 = {cu_q.numel()} offsets like cu_seqlens_q, "
                                 f"got {cu_k.numel()}")
        for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 0):
                raise ValueError(f"{name}: expected a non-negative int or None, got {m!r}")
    else:
        for name, m in (("max_seqlen_q", max_q), ("max_seqlen_k", max_k)):
            if m is not None:
                raise ValueError(f"{name}: only for the packed layout (cu_seqlens_q=...)")
    return left, right


def _check_values(q, k, cu_q, cu_k, max_q: int, max_k: int) -> tuple[int, int]:
    """Checks cu_seqlens and returns the true (max_seqlen_q, max_seqlen_k); padded layout: (Sq, Sk).

    Runs before any output is allocated. The values are read once per tensor
    (``_checks.read_once``): on CUDA, the first layer of a forward pays one device-to-host
    copy, the other layers and the backward none; cu_seqlens_k that is cu_seqlens_q is read once.
    """
    if cu_q is None:
        return q.shape[1], k.shape[1]
    result, seen = [], {}
    for name, cu, t, given in (("cu_seqlens_q", cu_q, q, max_q), ("cu_seqlens_k", cu_k, k, max_k)):
        total = t.shape[0]
        if (id(cu), total) in seen:  # cu_seqlens_k is cu_seqlens_q (self-attention)
            longest = seen[(id(cu), total)]
        else:
            longest = _checks.read_once(cu, ("cu_seqlens", total), lambda: _checks.longest_sequence(name, cu, total, t.device))
            seen[(id(cu), total)] = longest
        if longest is None:  # fake tensors / CUDA graph capture: nothing can be read
            if given < 0:
                if _checks._is_fake(cu):
                    result.append(0)
                    continue
                raise ValueError(f"max_seqlen_{name[-1]}: required while a CUDA graph is captured "
                                 "(cu_seqlens cannot be read then)")
            result.append(given)
            continue
        if given >= 0 and given < longest:
            arg = "max_seqlen_q" if name.endswith("q") else "max_seqlen_k"
            raise ValueError(f"{arg}: {given} is shorter than the longest sequence ({longest}) in {name}")
        result.append(longest)
    return result[0], result[1]


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@_dispatch.custom_op("grit::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (q's shape, contiguous), lse fp32 (B, Hq, Sq) or (Hq, Tq)). max_seqlen -1 = read from cu_seqlens."""
    max_q, max_k = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    impl = BACKENDS.select(q.device.type)
    return impl.forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, causal, (window_left, window_right),
                        softmax_scale)


def _lse_shape(q, cu_seqlens_q):
    if cu_seqlens_q is None:
        B, Sq, Hq, _ = q.shape
        return (B, Hq, Sq)
    return (q.shape[1], q.shape[0])


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_left, window_right,
      softmax_scale):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_seqlens_q), dtype=torch.float32)


@torch.library.custom_op("grit::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like (q, k, v) from d out (and d lse, None when unused)."""
    impl = BACKENDS.select(q.device.type)
    # Gradients from .sum() arrive expanded (stride 0): the kernels want a dense head dim.
    dout = dout.contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    if max_seqlen_q < 0 or max_seqlen_k < 0:
        max_seqlen_q, max_seqlen_k = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return impl.backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         causal, (window_left, window_right), softmax_scale)


@_attention_backward_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
      window_left, window_right, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, left, right, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, causal, left, right, scale)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
