"""In-batch contrastive loss: validation, cross-device gather, backend dispatch, torch.library op.

    contrastive_loss(q_BD, d_ND, *, temperature=0.02, targets=None, normalize=True,
                     reduction="mean", gather=False) -> () or (B,) fp32

Backends (grit_kernels/_backend.py), each a module with the same ``forward`` / ``backward``:
``triton`` (grit_kernels/triton/contrastive_loss.py), ``cpu`` (grit_kernels/cpu/contrastive_loss.py),
both without ever holding the B x N logits, and ``reference``.
"""

from __future__ import annotations

import math
import numbers

import torch

from .. import _backend
from . import _checks

BACKENDS = _backend.Table("contrastive_loss", ("reference", "cpu", "triton"))
_REDUCTIONS = ("mean", "sum", "none")


def contrastive_loss(
    q: torch.Tensor,
    d: torch.Tensor,
    *,
    temperature: float = 0.02,
    targets: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    gather: bool = False,
) -> torch.Tensor:
    """InfoNCE over in-batch negatives, GritLM's embedding loss.

    ``q`` (B, D) query embeddings, ``d`` (N, D) document embeddings, same dtype and device
    (fp16, bf16 or fp32). With ``normalize`` both are L2-normalised (``F.normalize``), and::

        logits (B, N) = q̂ · d̂ᵀ / temperature
        loss_i        = logsumexp_j logits[i, j] - logits[i, targets[i]]

    ``targets`` (B,) int32/int64 in ``[0, N)`` picks each query's positive; by default
    ``targets = arange(B) * (N // B)``, GritLM's layout of d as B groups of N // B rows
    ``[positive, hard negative, ...]`` (N must then be a multiple of B)::

        d rows:   q0+ q0- | q1+ q1- | q2+ q2- ...      (N = 2B: targets 0, 2, 4, ...)

    ``reduction``: "mean" (over queries), "sum", or "none" (per query). The result is fp32
    whatever the inputs' dtype; on GPU the logits are computed tile by tile and never stored.
    Differentiable in q and d.

    ``gather=True`` all-gathers q, d and the targets over ``torch.distributed`` (NCCL or
    gloo), so every query is scored against every rank's documents, as GritLM's
    ``negatives_cross_device``. Ranks may hold different B and N. Targets (default or
    explicit) index the rank's own d rows and are shifted by the rows of lower ranks. Every
    rank computes the loss of the whole gathered batch ("none": (B_total,) in rank order);
    only the local shard of q and d keeps its gradient, so summing the ranks' gradients
    (what DDP's all-reduce does, up to its 1 / world_size) gives the single-process gradient.
    """
    _validate(q, d, temperature, targets, normalize, reduction, gather)
    B, N = q.shape[0], d.shape[0]
    explicit = targets is not None
    if targets is None:
        targets = torch.arange(B, dtype=torch.int64, device=q.device) * (N // B)  # GritLM's layout
    targets = targets.to(torch.int64).contiguous()
    if gather:
        if explicit:
            _check_target_values(targets, N)
        q, d, targets = _gather(q, d, targets)
        explicit = False  # checked above, against the local N
    loss, _lse, _a, _b = _contrastive_loss_op(q, d, targets, float(temperature), bool(normalize), explicit)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _validate(q, d, temperature, targets, normalize, reduction, gather) -> None:
    """Everything but the targets' values, before anything is computed or communicated."""
    _checks.check_tensor("q", q, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.check_tensor("d", d, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=q.device)
    if d.dtype != q.dtype:
        raise TypeError(f"d: expected the dtype of q ({q.dtype}), got {d.dtype}; cast both to one dtype")
    B, D = q.shape
    N = d.shape[0]
    if B == 0:
        raise ValueError(f"q: empty batch, got shape {tuple(q.shape)}; expected B >= 1 queries")
    if N == 0:
        raise ValueError(f"d: no documents, got shape {tuple(d.shape)}; expected N >= 1")
    if D == 0:
        raise ValueError(f"q: expected an embedding dimension D >= 1, got shape {tuple(q.shape)}")
    if d.shape[1] != D:
        raise ValueError(f"d: expected shape (N, D) with D = {D} like q, got {tuple(d.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a positive float, got {type(temperature).__name__}")
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize: expected a bool, got {type(normalize).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {', '.join(map(repr, _REDUCTIONS))}, got {reduction!r}")
    if not isinstance(gather, bool):
        raise TypeError(f"gather: expected a bool, got {type(gather).__name__}")
    if gather and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("gather: True needs an initialised torch.distributed process group")
    if targets is None:
        if N % B:
            raise ValueError(
                f"targets: the default targets arange(B) * (N // B) need N a multiple of B, got B = {B} "
                f"queries and N = {N} documents (d); pass targets explicitly"
            )
    else:
        _checks.check_tensor("targets", targets, dtypes=_checks.INDEX_DTYPES, shape=(B,), device=q.device)


def _check_target_values(targets: torch.Tensor, N: int) -> None:
    """Targets in [0, N) (one device-to-host copy on CUDA; skipped while tracing)."""
    if _checks._is_fake(targets) or targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= N:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets: expected indices into the N = {N} documents of d (0 <= t < {N}), got {bad}")


# ---------------------------------------------------------------------------------------
# cross-device negatives
# ---------------------------------------------------------------------------------------


def _gather(q, d, targets):
    """All-gather q, d and targets (shifted to index the gathered d); local shards keep grads."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return q, d, targets
    # Sizes first: ranks may hold different batch sizes (the last batch of an epoch).
    mine = torch.tensor([q.shape[0], d.shape[0], q.shape[1]], dtype=torch.int64, device=q.device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine)
    sizes = torch.stack(sizes).cpu().tolist()
    dims = {D for _, _, D in sizes}
    if len(dims) != 1:
        raise ValueError(f"q: gather needs one embedding size D on every rank, got {[D for _, _, D in sizes]}")
    Bs, Ns = [s[0] for s in sizes], [s[1] for s in sizes]
    shift = sum(Ns[:rank])
    return (_all_gather_rows(q, Bs, rank), _all_gather_rows(d, Ns, rank),
            _all_gather_rows(targets + shift, Bs, rank))


def _all_gather_rows(x, rows, rank):
    """Concatenate every rank's x (rows[r], ...) in rank order; this rank's piece is x itself."""
    import torch.distributed as dist

    most = max(rows)
    send = x.detach()
    if send.shape[0] < most:  # all_gather wants one shape: pad, then cut the padding off
        send = torch.cat([send, send.new_zeros((most - send.shape[0], *send.shape[1:]))])
    parts = [torch.empty_like(send) for _ in rows]
    dist.all_gather(parts, send.contiguous())
    parts = [p[:n] for p, n in zip(parts, rows)]
    parts[rank] = x  # autograd flows into the local shard only, as in GritLM
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("grit::contrastive_loss", mutates_args=())
def _contrastive_loss_op(
    q: torch.Tensor,
    d: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    normalize: bool,
    check_targets: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss (B,), lse (B,), a (B,), b (N,)), fp32: per-query loss, row logsumexp and the
    row scales of the logits (a = 1 / (|q| T), b = 1 / |d|), saved for the backward."""
    if check_targets:
        _check_target_values(targets, d.shape[0])
    impl = BACKENDS.select(q.device.type)
    return impl.forward(q.contiguous(), d.contiguous(), targets.contiguous(), temperature, normalize)


@_contrastive_loss_op.register_fake
def _(q, d, targets, temperature, normalize, check_targets):
    f32 = dict(dtype=torch.float32, device=q.device)
    B, N = q.shape[0], d.shape[0]
    return q.new_empty((B,), **f32), q.new_empty((B,), **f32), q.new_empty((B,), **f32), d.new_empty((N,), **f32)


@torch.library.custom_op("grit::contrastive_loss_backward", mutates_args=())
def _contrastive_loss_backward_op(
    grad_loss: torch.Tensor,
    q: torch.Tensor,
    d: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dq (B, D), dd (N, D)) in the inputs' dtype from dL/dloss (B,)."""
    impl = BACKENDS.select(q.device.type)
    # Gradients of .mean()/.sum() arrive expanded (stride 0).
    return impl.backward(grad_loss.float().contiguous(), q.contiguous(), d.contiguous(), targets.contiguous(),
                         lse.contiguous(), a.contiguous(), b.contiguous(), temperature, normalize)


@_contrastive_loss_backward_op.register_fake
def _(grad_loss, q, d, targets, lse, a, b, temperature, normalize):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        d, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, d, targets, temperature, normalize, _check = inputs
    _loss, lse, a, b = output
    ctx.save_for_backward(q, d, targets, lse, a, b)
    ctx.temperature, ctx.normalize = temperature, normalize


def _backward(ctx, grad_loss, _grad_lse, _grad_a, _grad_b):
    q, d, targets, lse, a, b = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None, None, None, None
    dq, dd = _contrastive_loss_backward_op(grad_loss, q, d, targets, lse, a, b, ctx.temperature,
                                                      ctx.normalize)
    return dq, dd, None, None, None, None


_contrastive_loss_op.register_autograd(_backward, setup_context=_setup_context)
