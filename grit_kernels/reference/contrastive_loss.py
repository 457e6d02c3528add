"""In-batch contrastive (InfoNCE) loss in plain PyTorch: the oracle for tests and the reference backend.

Written for clarity, not memory: it holds the whole (B, N) logit matrix. Semantics are
GritLM's ``DistributedContrastiveLoss`` (gritlm/training/model.py):

    logits[i, j] = q̂_i · d̂_j / temperature          q̂ = q / max(|q|, 1e-12) (F.normalize)
    loss[i]      = logsumexp_j logits[i, j] - logits[i, targets[i]]

with ``targets[i] = i * (N // B)`` by default: documents come in groups of N // B
(``[positive, hard negative, ...]`` per query) and query i's positive opens group i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12


def default_targets(B: int, N: int, device=None) -> torch.Tensor:
    """(B,) int64 index of each query's positive: ``arange(B) * (N // B)``."""
    return torch.arange(B, dtype=torch.int64, device=device) * (N // max(B, 1))


def logits(q_BD, d_ND, temperature: float, normalize: bool, dtype=torch.float32) -> torch.Tensor:
    """(B, N) logits computed in ``dtype`` (fp32/fp64 for an oracle, the inputs' dtype for
    the low-precision reference that the tolerance rule measures kernels against)."""
    q, d = q_BD.to(dtype), d_ND.to(dtype)
    if normalize:
        q, d = F.normalize(q, dim=-1, eps=NORM_EPS), F.normalize(d, dim=-1, eps=NORM_EPS)
    return (q @ d.T) / temperature


def contrastive_loss(q_BD, d_ND, targets_B=None, *, temperature=0.02, normalize=True, reduction="mean",
                     dtype=torch.float32) -> torch.Tensor:
    """Differentiable reference: matmul + ``F.cross_entropy``. ``dtype`` as in ``logits``."""
    B, N = q_BD.shape[0], d_ND.shape[0]
    if targets_B is None:
        targets_B = default_targets(B, N, q_BD.device)
    return F.cross_entropy(logits(q_BD, d_ND, temperature, normalize, dtype), targets_B.long(), reduction=reduction)


def forward(q, d, targets, temperature: float, normalize: bool):
    """The op's forward: (loss (B,) per query, lse (B,) logsumexp of each row, and the row
    scales a (B,), b (N,) of the logits, unused here), fp32."""
    x = logits(q, d, temperature, normalize)
    lse = torch.logsumexp(x, dim=1)
    loss = lse - x.gather(1, targets.long()[:, None])[:, 0]
    a = torch.full((q.shape[0],), 1.0 / temperature, device=q.device)
    return loss, lse, a, torch.ones(d.shape[0], device=d.device)


def backward(grad_loss, q, d, targets, lse, a, b, temperature: float, normalize: bool):
    """(dq, dd) in the inputs' dtype for ``forward``'s per-query loss (lse, a, b unused: it
    recomputes everything, as an oracle should), written out by hand
    (a custom op's implementation runs below autograd, so it cannot call autograd):

        dL/dlogits = g_i (softmax_ij - [j = t_i])
        dq̂ = dL/dlogits @ d̂ / T,   dq = (dq̂ - q̂ (q̂ · dq̂)) / max(|q|, eps)   (likewise dd)
    """
    qf, df = q.float(), d.float()
    x = logits(qf, df, temperature, normalize)
    onehot = F.one_hot(targets.long(), x.shape[1]).to(x.dtype)
    G = grad_loss.float()[:, None] * (torch.softmax(x, dim=1) - onehot)
    q_hat = F.normalize(qf, dim=-1, eps=NORM_EPS) if normalize else qf
    d_hat = F.normalize(df, dim=-1, eps=NORM_EPS) if normalize else df
    dq, dd = (G @ d_hat) / temperature, (G.T @ q_hat) / temperature
    if normalize:
        dq, dd = _normalize_backward(dq, qf, q_hat), _normalize_backward(dd, df, d_hat)
    return dq.to(q.dtype), dd.to(d.dtype)


def _normalize_backward(grad_hat, x, x_hat):
    norm = x.norm(dim=1, keepdim=True)
    # Below eps F.normalize divides by the constant eps: no radial term.
    radial = torch.where(norm > NORM_EPS, x_hat * (x_hat * grad_hat).sum(dim=1, keepdim=True), 0.0)
    return (grad_hat - radial) / norm.clamp_min(NORM_EPS)
