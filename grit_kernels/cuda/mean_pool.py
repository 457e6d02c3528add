"""Masked mean pooling through csrc/mean_pool.cu: the cuda backend of ``mean_pool``.

    forward(hidden, mask, cu_seqlens, skip, normalize, weighted) -> out (B, D), norm (B,), den (B,) fp32
    backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize, weighted) -> d hidden

CUDA tensors launch the kernels; CPU tensors run the host build of the same per-row code.
Split heuristic: about four blocks per SM; a row is split along S only when B * column
blocks fall short (csrc combines the splits with a counter per row, no second launch).
"""

from __future__ import annotations

import torch

from .. import _backend, _shared
from ._launch import DTYPE_CODES, ptr, sm_count, stream, vec_width


def forward(hidden, mask, cu_seqlens, skip, normalize: bool, weighted: bool):
    C = _backend.C()
    B, S, D, T = _shared.pool_layout(hidden, cu_seqlens)
    weights = _shared.padded_weights(mask, weighted) if mask is not None else None
    f32 = dict(dtype=torch.float32, device=hidden.device)
    if B == 0 or hidden.numel() == 0:
        # Nothing to read: every row pools nothing (zeros, like the other backends). csrc is
        # not called, since an empty tensor's null data pointer reads as a missing argument.
        return torch.zeros((B, D), **f32), torch.zeros((B,), **f32), torch.zeros((B,), **f32)
    out, norm, den = torch.empty((B, D), **f32), torch.empty((B,), **f32), torch.empty((B,), **f32)
    common = dict(
        hidden=ptr(hidden), weights=ptr(weights), cu_seqlens=ptr(cu_seqlens), skip=ptr(skip),
        out=ptr(out), norm=ptr(norm), den=ptr(den), B=B, S=S, D=D, T=T, weighted=weighted,
        normalize=normalize, dtype=DTYPE_CODES[hidden.dtype],
    )
    if not hidden.is_cuda:
        C.mean_pool_forward_host(**common)
        return out, norm, den
    vec = vec_width(hidden, D)
    col_blocks = -(-D // (32 * vec))
    # Aim for ~4 blocks per SM; split rows along S only when B * col_blocks falls short.
    row_len = S if mask is not None else max(1, T // max(B, 1))
    splits = max(1, min(-(-4 * sm_count(hidden.device.index) // max(B * col_blocks, 1)), -(-row_len // 32), 65535))
    workspace = torch.empty(splits * B * D, **f32)
    counters = torch.zeros(B, dtype=torch.int32, device=hidden.device)
    C.mean_pool_forward(**common, workspace=ptr(workspace), counters=ptr(counters), splits=splits, vec=vec,
                        stream=stream(hidden))
    return out, norm, den


def backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize: bool, weighted: bool):
    C = _backend.C()
    B, S, D, T = _shared.pool_layout(hidden, cu_seqlens)
    if B == 0 or hidden.numel() == 0:
        return torch.zeros_like(hidden)  # see forward
    dy = _shared.grad_of_mean(grad_out, out, norm, normalize)
    weights = _shared.padded_weights(mask, weighted) if mask is not None else None
    dhidden = torch.empty_like(hidden)
    den = den.contiguous()
    common = dict(
        hidden=ptr(hidden), weights=ptr(weights), cu_seqlens=ptr(cu_seqlens), skip=ptr(skip), dy=ptr(dy),
        den=ptr(den), dhidden=ptr(dhidden), B=B, S=S, D=D, T=T, weighted=weighted,
        dtype=DTYPE_CODES[hidden.dtype],
    )
    if not hidden.is_cuda:
        C.mean_pool_backward_host(**common)
    else:
        C.mean_pool_backward(**common, vec=min(vec_width(hidden, D), vec_width(dhidden, D)), stream=stream(hidden))
    return dhidden
