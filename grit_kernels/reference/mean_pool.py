"""Masked mean pooling in plain PyTorch: the oracle for tests and the reference backend.

Written for clarity, not speed. Semantics are GritLM's (gritlm/gritlm.py, ``pooling``):

* ``mean``:      ``sum_s m[s] * h[s] / sum_s m[s]``
* ``weighted``:  GritLM's ``weightedmean``: the pooled tokens get weights 1, 2, ..., n in
                 order (``m * cumsum(m)``), then the weighted sum is divided by the weights' sum.

A row with nothing to pool gives zeros (GritLM would divide by zero). ``normalize`` is
``torch.nn.functional.normalize`` (divide by ``max(||y||, 1e-12)``). Results are fp32.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12


def token_weights_padded(mask_BS: torch.Tensor, weighted: bool) -> torch.Tensor:
    """(B, S) fp32 weight of every token: 1 per pooled token, or 1..n when ``weighted``."""
    w = (mask_BS != 0).to(torch.float32)
    if weighted:
        w = w * torch.cumsum(w, dim=1)
    return w


def token_weights_packed(cu_seqlens: torch.Tensor, skip: torch.Tensor, total: int, weighted: bool):
    """(T,) fp32 weight of every packed token and (T,) int64 row of every token (-1 past the end)."""
    w = torch.zeros(total, dtype=torch.float32, device=cu_seqlens.device)
    row = torch.full((total,), -1, dtype=torch.int64, device=cu_seqlens.device)
    cu = cu_seqlens.tolist()
    for b in range(len(cu) - 1):
        start, end = cu[b], cu[b + 1]
        first = min(start + int(skip[b]), end)  # the instruction's tokens are not pooled
        row[start:end] = b
        n = end - first
        if n > 0:
            w[first:end] = torch.arange(1, n + 1, dtype=torch.float32) if weighted else 1.0
    return w, row


def _finish(sums_BD: torch.Tensor, den_B: torch.Tensor, normalize: bool):
    # Empty rows: 0 / max(0, 1) = 0 rather than 0 / 0.
    y = sums_BD / den_B.clamp_min(1.0)[:, None] if sums_BD.numel() else sums_BD
    y = torch.where(den_B[:, None] > 0, y, torch.zeros_like(y))
    norm = y.norm(dim=1)
    if normalize:
        y = y / norm.clamp_min(NORM_EPS)[:, None]
    return y, norm


def _sums_padded(hidden_BSD, mask_BS, weighted, dtype):
    w = token_weights_padded(mask_BS, weighted).to(dtype)
    return torch.einsum("bs,bsd->bd", w, hidden_BSD.to(dtype)), w.sum(dim=1)


def _sums_packed(hidden_TD, cu_seqlens, skip, weighted, dtype):
    B = cu_seqlens.numel() - 1
    w, row = token_weights_packed(cu_seqlens, skip, hidden_TD.shape[0], weighted)
    inside = row >= 0
    w, row = w[inside].to(dtype), row[inside]
    sums = torch.zeros(B, hidden_TD.shape[1], dtype=dtype, device=hidden_TD.device)
    sums.index_add_(0, row, w[:, None] * hidden_TD[inside].to(dtype))
    den = torch.zeros(B, dtype=dtype, device=hidden_TD.device).index_add_(0, row, w)
    return sums, den


def mean_pool_padded(hidden_BSD, mask_BS, *, normalize=False, weighted=False, dtype=torch.float32):
    """hidden (B, S, D), mask (B, S) nonzero = pooled -> (B, D) in ``dtype`` (fp32 or fp64)."""
    return _finish(*_sums_padded(hidden_BSD, mask_BS, weighted, dtype), normalize)[0]


def mean_pool_packed(hidden_TD, cu_seqlens, skip, *, normalize=False, weighted=False, dtype=torch.float32):
    """hidden (T, D), cu_seqlens (B + 1,), skip (B,) leading tokens left out -> (B, D)."""
    return _finish(*_sums_packed(hidden_TD, cu_seqlens, skip, weighted, dtype), normalize)[0]


def forward(hidden, mask, cu_seqlens, skip, normalize, weighted):
    """The op's forward: (out (B, D), norm (B,) of the unnormalised mean, den (B,) weight sums), fp32."""
    if mask is not None:
        sums, den = _sums_padded(hidden, mask, weighted, torch.float32)
    else:
        sums, den = _sums_packed(hidden, cu_seqlens, skip, weighted, torch.float32)
    out, norm = _finish(sums, den, normalize)
    return out, norm, den


def grad_of_mean(grad_out, out, norm, normalize):
    """Gradient w.r.t. the unnormalised mean y, (B, D) fp32.

    With ``normalize``, ``o = y / max(|y|, eps)`` and ``dy = (g - o (o . g)) / |y|``
    (for ``|y| > eps``; below it the division by eps is linear, so ``dy = g / eps``).
    """
    g = grad_out.float()
    if not normalize:
        return g
    d = norm.clamp_min(NORM_EPS)[:, None]
    return torch.where(norm[:, None] > NORM_EPS, (g - out * (out * g).sum(dim=1, keepdim=True)) / d, g / d)


def backward(grad_out, hidden, mask, cu_seqlens, skip, out, norm, den, normalize, weighted):
    """d hidden for ``forward``: every token gets ``w / den * dy`` of its row (``den`` is
    recomputed from the weights, as an oracle should)."""
    dy = grad_of_mean(grad_out, out, norm, normalize)
    if mask is not None:
        w = token_weights_padded(mask, weighted)
        den = w.sum(dim=1, keepdim=True).clamp_min(1.0)
        return ((w / den)[:, :, None] * dy[:, None, :]).to(hidden.dtype)
    w, row = token_weights_packed(cu_seqlens, skip, hidden.shape[0], weighted)
    B = cu_seqlens.numel() - 1
    den = torch.zeros(B, dtype=torch.float32, device=hidden.device)
    inside = row >= 0
    den.index_add_(0, row[inside], w[inside])
    scale = torch.zeros_like(w)
    scale[inside] = w[inside] / den.clamp_min(1.0)[row[inside]]
    dy_T = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dy_T[inside] = dy[row[inside]]
    return (scale[:, None] * dy_T).to(hidden.dtype)
