"""Masked mean pooling on CPU tensors: the cpu backend of ``mean_pool``, vectorised PyTorch.

    forward(hidden, mask, cu_seqlens, skip, normalize, weighted) -> out (B, D), norm (B,), den (B,) fp32
    backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize, weighted) -> d hidden

Padded: hidden (B, S, D), mask (B, S). Packed: hidden (T, D), cu_seqlens (B + 1,), skip (B,).
One batched matmul (padded) or one index_add (packed) over fp32 token weights; no Python
loop over rows. The weighted sum is taken in fp32 whatever hidden's dtype.
"""

from __future__ import annotations

import torch

from .. import _shared


def _packed_weights(cu_seqlens, skip, T: int, weighted: bool):
    """(T,) fp32 weight and (T,) int64 row of every packed token (row B for tokens past the end)."""
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(torch.int64)
    row = torch.searchsorted(cu[1:], torch.arange(T), right=True)  # token t lies in row b: cu[b] <= t < cu[b+1]
    inside = row < B
    r = row.clamp_max(max(B - 1, 0))
    rank = torch.arange(T) - cu[r] - skip.to(torch.int64)[r] if B else torch.zeros(T, dtype=torch.int64)
    w = torch.where(inside & (rank >= 0), (rank + 1).to(torch.float32) if weighted else torch.ones(()), 0.0)
    return w.to(torch.float32), row


def _finish(sums_BD, den_B, normalize: bool):
    """Mean, its norm, and the normalised mean; rows with nothing pooled stay 0, never 0/0."""
    y = torch.where(den_B[:, None] > 0, sums_BD / den_B.clamp_min(1.0)[:, None], 0.0)
    norm = torch.linalg.vector_norm(y, dim=1)
    if normalize:
        y = y / norm.clamp_min(_shared.NORM_EPS)[:, None]
    return y, norm


def forward(hidden, mask, cu_seqlens, skip, normalize: bool, weighted: bool):
    if mask is not None:
        w = _shared.padded_weights(mask, weighted)  # (B, S)
        sums = torch.bmm(w[:, None, :], hidden.float())[:, 0]
        den = w.sum(dim=1)
    else:
        B, D = cu_seqlens.numel() - 1, hidden.shape[1]
        w, row = _packed_weights(cu_seqlens, skip, hidden.shape[0], weighted)
        sums = torch.zeros(B + 1, D, dtype=torch.float32).index_add_(0, row, w[:, None] * hidden.float())[:B]
        den = _shared.packed_denominators(cu_seqlens, skip, weighted)
    out, norm = _finish(sums, den, normalize)
    return out, norm, den


def backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize: bool, weighted: bool):
    dy = _shared.grad_of_mean(grad_out, out, norm, normalize)  # (B, D)
    scale = 1.0 / den.clamp_min(1.0)
    if mask is not None:
        w = _shared.padded_weights(mask, weighted) * scale[:, None]  # (B, S)
        return (w[:, :, None] * dy[:, None, :]).to(hidden.dtype)
    w, row = _packed_weights(cu_seqlens, skip, hidden.shape[0], weighted)
    dy = torch.cat([dy, dy.new_zeros(1, dy.shape[1])])  # row B: tokens past the last offset
    scale = torch.cat([scale, scale.new_zeros(1)])
    return ((w * scale[row])[:, None] * dy[row]).to(hidden.dtype)
