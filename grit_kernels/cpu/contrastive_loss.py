"""In-batch contrastive loss on CPU tensors: the cpu backend of ``contrastive_loss``.

    forward(q_BD, d_ND, targets_B, temperature, normalize) -> loss (B,), lse (B,), a (B,), b (N,) fp32
    backward(grad_loss_B, q, d, targets, lse, a, b, temperature, normalize) -> dq (B, D), dd (N, D)

logits[i, j] = (q_i · d_j) a_i b_j with a = 1 / (|q| T), b = 1 / |d| (normalize) or a = 1 / T,
b = 1. Like the Triton kernels it never holds the whole (B, N) logit matrix: query rows go
through in chunks of ``CHUNK`` (one fp32 (CHUNK, N) tile at a time, one matmul each), and the
backward recomputes each chunk's softmax from the saved lse. All arithmetic in fp32.
"""

from __future__ import annotations

import torch

from .. import _shared

CHUNK = 1024  # query rows per tile: 1024 x N fp32 (32 MB at N = 8192) bounds the memory


def _scales(qf, df, temperature: float, normalize: bool):
    if normalize:
        a = 1.0 / (torch.linalg.vector_norm(qf, dim=1).clamp_min(_shared.NORM_EPS) * temperature)
        b = 1.0 / torch.linalg.vector_norm(df, dim=1).clamp_min(_shared.NORM_EPS)
        return a, b
    return torch.full((qf.shape[0],), 1.0 / temperature), torch.ones(df.shape[0])


def forward(q, d, targets, temperature: float, normalize: bool):
    qf, df = q.float(), d.float()
    a, b = _scales(qf, df, temperature, normalize)
    d_scaled = df * b[:, None]  # (N, D)
    loss, lse = torch.empty(q.shape[0]), torch.empty(q.shape[0])
    for c in range(0, q.shape[0], CHUNK):
        rows = slice(c, c + CHUNK)
        logits = (qf[rows] @ d_scaled.T) * a[rows, None]  # (chunk, N)
        lse[rows] = torch.logsumexp(logits, dim=1)
        loss[rows] = lse[rows] - logits.gather(1, targets[rows, None])[:, 0]
    return loss, lse, a, b


def _unit_backward(grad_hat, x, inv_norm):
    """Through x̂ = x / max(|x|, eps): (g - x̂ (x̂ · g)) / |x|; below eps the division is by
    the constant eps, so there is no radial term."""
    x_hat = x * inv_norm[:, None]
    big = (1.0 / inv_norm > _shared.NORM_EPS)[:, None]
    radial = torch.where(big, x_hat * (x_hat * grad_hat).sum(dim=1, keepdim=True), 0.0)
    return (grad_hat - radial) * inv_norm[:, None]


def backward(grad_loss, q, d, targets, lse, a, b, temperature: float, normalize: bool):
    """dL/dlogits = g_i (softmax_ij - [j = t_i]), chunk by chunk; then through the scales."""
    qf, df = q.float(), d.float()
    # With logits = (q a T) · (d b) / T, the unit (or raw) vectors are q a T and d b.
    q_unit, d_unit = qf * (a * temperature)[:, None], df * b[:, None]
    g_q = torch.empty_like(qf)   # dL / d q_unit
    g_d = torch.zeros_like(df)   # dL / d d_unit
    for c in range(0, q.shape[0], CHUNK):
        rows = slice(c, c + CHUNK)
        # Bitwise the forward's logits: at |logits| ~ 1e9 (unnormalised fp16 rows) any other
        # rounding of them would move exp(logits - lse) by orders of magnitude.
        logits = (qf[rows] @ d_unit.T) * a[rows, None]
        G = torch.exp(logits - lse[rows, None])
        G[torch.arange(G.shape[0]), targets[rows]] -= 1.0
        G *= grad_loss[rows, None] / temperature
        g_q[rows] = G @ d_unit
        g_d += G.T @ q_unit[rows]
    if normalize:
        g_q, g_d = _unit_backward(g_q, qf, a * temperature), _unit_backward(g_d, df, b)
    return g_q.to(q.dtype), g_d.to(d.dtype)
