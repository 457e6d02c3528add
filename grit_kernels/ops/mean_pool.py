"""Masked mean pooling: validation, backend dispatch, torch.library registration, autograd.

    mean_pool(hidden_BSD, mask_BS, *, normalize=False, weighted=False)             -> (B, D) fp32
    mean_pool(hidden_TD, cu_seqlens=cu_B1, skip=skip_B, normalize=..., weighted=...) -> (B, D) fp32

Backends (grit_kernels/_backend.py), each a module with the same ``forward`` / ``backward``:
``cuda`` (grit_kernels/cuda/mean_pool.py over csrc/mean_pool.cu), ``triton``
(grit_kernels/triton/mean_pool.py), ``cpu`` (grit_kernels/cpu/mean_pool.py), ``reference``.
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, _dispatch

BACKENDS = _backend.Table("mean_pool", ("reference", "cpu", "triton", "cuda"))


def mean_pool(
    hidden: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
    normalize: bool = False,
    weighted: bool = False,
) -> torch.Tensor:
    """Mean of the hidden states of the pooled tokens of every sequence, in fp32.

    Padded layout (GritLM's): ``hidden`` (B, S, D) and ``mask`` (B, S), nonzero = pooled.
    GritLM leaves the instruction out by zeroing its tokens in the mask.

    Packed layout: ``hidden`` (T, D) holds the sequences back to back, ``cu_seqlens``
    (B + 1,) int32 their offsets (``cu_seqlens[b]:cu_seqlens[b+1]`` is sequence b), and
    ``skip`` (B,) int32 (default zeros) how many leading tokens of each sequence (the
    instruction) are attended to by the model but left out of the mean::

        tokens of row b:  [ skip[b] instruction tokens | pooled tokens ... ]
                            weight 0                     weight 1 (or 1, 2, ..., n)

    ``weighted=True`` is GritLM's ``weightedmean``: the n pooled tokens get weights 1..n.
    ``normalize=True`` L2-normalises each row like ``F.normalize`` (eps 1e-12).
    A row with nothing to pool (all masked, or ``skip >= length``) gives zeros, never NaN.
    Differentiable in ``hidden``.

    Returns: (B, D) float32.
    """
    _validate(hidden, mask, cu_seqlens, skip)
    if cu_seqlens is not None and skip is None:
        skip = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.int32, device=hidden.device)
    out, _norm, _den = _dispatch.call(_mean_pool_op, hidden, mask, cu_seqlens, skip, bool(normalize), bool(weighted))
    return out


def _validate(hidden, mask, cu_seqlens, skip) -> None:
    """Shapes, dtypes and devices (traceable checks; value checks run in the op itself)."""
    packed = cu_seqlens is not None
    _checks.check_tensor("hidden", hidden, ndim=2 if packed else 3, dtypes=_checks.FLOAT_DTYPES)
    if hidden.shape[-1] < 1:
        raise ValueError(f"hidden: expected a last dimension D >= 1, got shape {tuple(hidden.shape)}")
    if packed:
        if mask is not None:
            raise ValueError("mask: pass either mask (padded layout) or cu_seqlens/skip (packed layout), not both")
        _checks.check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=hidden.device)
        if cu_seqlens.numel() < 1:
            raise ValueError("cu_seqlens: expected B + 1 >= 1 offsets, got an empty tensor")
        if skip is not None:
            B = cu_seqlens.numel() - 1
            _checks.check_tensor("skip", skip, dtypes=(torch.int32,), shape=(B,), device=hidden.device)
    else:
        if mask is None:
            raise ValueError("mask: required for the padded layout hidden (B, S, D); use cu_seqlens= for packed (T, D)")
        if skip is not None:
            raise ValueError("skip: only for the packed layout (cu_seqlens=...); fold the instruction into mask instead")
        B, S, _ = hidden.shape
        _checks.check_tensor("mask", mask, ndim=2, device=hidden.device)
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"mask: expected shape (B, S) = {(B, S)} matching hidden, got {tuple(mask.shape)}")
        if mask.is_complex():
            raise TypeError("mask: expected a bool, integer or real floating tensor")


def _check_values(cu_seqlens, skip, total: int) -> None:
    """Value checks that need the data (one small device-to-host copy on CUDA)."""
    if cu_seqlens is None:
        return
    # Read once per tensor (_checks.read_once): no sync on CUDA for a cu_seqlens that the
    # model's attention layers already checked.
    _checks.read_once(cu_seqlens, ("cu_seqlens", total),
                      lambda: _checks.longest_sequence("cu_seqlens", cu_seqlens, total, cu_seqlens.device))

    def check_skip():
        if skip.numel() and not _checks._is_fake(skip) and bool((skip < 0).any()):
            raise ValueError(f"skip: expected non-negative instruction lengths, got {skip.tolist()[:16]}")
        return True

    if skip is not None:
        _checks.read_once(skip, ("skip",), check_skip)


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@_dispatch.custom_op("grit::mean_pool", mutates_args=())
def _mean_pool_op(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    skip: torch.Tensor | None,
    normalize: bool,
    weighted: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (B, D), norm (B,) of the unnormalised mean, den (B,) weight sums), fp32."""
    _check_values(cu_seqlens, skip, hidden.shape[0])
    impl = BACKENDS.select(hidden.device.type)
    return impl.forward(hidden.contiguous(), mask, cu_seqlens, skip, normalize, weighted)


@_mean_pool_op.register_fake
def _(hidden, mask, cu_seqlens, skip, normalize, weighted):
    B = mask.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    D = hidden.shape[-1]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return hidden.new_empty((B, D), **f32), hidden.new_empty((B,), **f32), hidden.new_empty((B,), **f32)


@torch.library.custom_op("grit::mean_pool_backward", mutates_args=())
def _mean_pool_backward_op(
    grad_out: torch.Tensor,
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    skip: torch.Tensor | None,
    out: torch.Tensor,
    norm: torch.Tensor,
    den: torch.Tensor,
    normalize: bool,
    weighted: bool,
) -> torch.Tensor:
    """d hidden (same shape and dtype as hidden) from d out (B, D)."""
    impl = BACKENDS.select(hidden.device.type)
    # Gradients from .sum() arrive expanded (stride 0): the kernels want dense rows.
    return impl.backward(grad_out.contiguous(), hidden, mask, cu_seqlens, skip, out, norm, den, normalize,
                         weighted)


@_mean_pool_backward_op.register_fake
def _(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize, weighted):
    return torch.empty_like(hidden)


def _setup_context(ctx, inputs, output):
    hidden, mask, cu_seqlens, skip, normalize, weighted = inputs
    out, norm, den = output
    ctx.save_for_backward(hidden, mask, cu_seqlens, skip, out, norm, den)
    ctx.normalize, ctx.weighted = normalize, weighted


def _backward(ctx, grad_out, _grad_norm, _grad_den):
    hidden, mask, cu_seqlens, skip, out, norm, den = ctx.saved_tensors
    grad_hidden = _mean_pool_backward_op(
        grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, ctx.normalize, ctx.weighted
    )
    return grad_hidden, None, None, None, None, None


_mean_pool_op.register_autograd(_backward, setup_context=_setup_context)
