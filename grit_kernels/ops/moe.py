"""Mixtral mixture of experts: routing, grouped SwiGLU experts, load-balancing loss.

    moe_route(router_logits_TE, top_k)                       -> (weights_TK, experts_TK int32)
    moe_experts(x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK, experts_TK) -> (T, D)
    moe_aux_loss(router_logits, top_k, mask)                 -> () fp32

Legend: T tokens, D hidden size, E experts, F expert hidden size, K = top_k, TK = T * K
routing slots (slot t * K + j is token t's j-th expert), M rows of the expert-sorted layout.

A Mixtral MoE layer is::

    router_logits = x @ gate.T                           # (T, E), the model's Linear
    weights, experts = moe_route(router_logits, top_k=2)
    y = moe_experts(x, w1, w2, w3, weights, experts)     # gradients reach x, w1, w2, w3, weights
                                                         # and through weights the router logits
    loss = lm_loss + coef * moe_aux_loss((router_logits, ...), top_k=2, mask=attention_mask)

Backends (grit_kernels/_backend.py), each a module with the same ``route`` / ``forward`` /
``backward`` (forward and backward being the experts'):
  ``cuda``      - grit_kernels/cuda/moe.py: csrc/moe.cu's routing, sort/align and fp32 combine
                  around the Triton expert GEMMs.
  ``triton``    - grit_kernels/triton/moe.py: Triton GEMMs; routing, sort/align and combine
                  with torch ops (grit_kernels/_shared.py, no host sync).
  ``cpu``       - grit_kernels/cpu/moe.py: one GEMM per expert over the expert-sorted slots.
  ``reference`` - grit_kernels/reference/moe.py, when forced.
No host synchronisation on CUDA tensors: out-of-range expert ids are therefore only
rejected for CPU tensors; on the GPU their slots contribute zero. The load-balancing loss
is a few torch ops on any device, differentiated by autograd (no backend choice).
"""

from __future__ import annotations

import torch

from .. import _backend
from . import _checks, _dispatch

BACKENDS = _backend.Table("moe", ("reference", "cpu", "triton", "cuda"))


# ---------------------------------------------------------------------------------------
# public functions
# ---------------------------------------------------------------------------------------


def moe_route(router_logits: torch.Tensor, top_k: int = 2):
    """Mixtral's router: softmax over E in fp32, top-k, renormalise, cast to the logits' dtype.

    router_logits: (T, E) fp32/fp16/bf16 -> (weights (T, top_k) in router_logits' dtype,
    experts (T, top_k) int32), each row's experts in decreasing probability. Ties between equal
    probabilities go to the lowest expert index. Differentiable in router_logits through the
    weights: w = softmax(router_logits[experts]) over the k chosen logits.
    """
    _checks.check_tensor("router_logits", router_logits, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    top_k = _check_top_k(top_k, router_logits.shape[1], "router_logits")
    return _dispatch.call(_moe_route_op, router_logits, top_k)


def moe_experts(x, w1, w2, w3, weights, experts):
    """Mixtral's experts: ``sum_j weights[t, j] * w2_e @ (silu(w1_e @ x_t) * (w3_e @ x_t))``.

    x (T, D); w1, w3 (E, F, D) and w2 (E, D, F): the HF per-expert Linear weights stacked
    (HF's fused ``gate_up_proj`` is ``cat([w1, w3], dim=1)``), all in x's dtype;
    weights (T, K) float; experts (T, K) int32/int64 in [0, E). K <= E.
    The K expert outputs of a token are summed in fp32. Differentiable in x, w1, w2, w3 and
    weights. Returns (T, D) in x's dtype.
    """
    _validate_experts(x, w1, w2, w3, weights, experts)
    if experts.dtype != torch.int32:
        experts = experts.to(torch.int32)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w1, w2, w3, weights))
    return _dispatch.call(_moe_experts_op, x, w1, w2, w3, weights, experts.contiguous(), save)[0]


def moe_aux_loss(router_logits, top_k: int = 2, mask=None, num_experts: int | None = None):
    """transformers' ``load_balancing_loss_func`` (Switch Transformer's auxiliary loss).

    router_logits: a tuple/list of per-layer (T, E) logits, or one (L*T, E) tensor holding
    the layers back to back. mask: optional (B, S) attention mask with B*S = T (nonzero = real
    token), the same for every layer. Returns an fp32 scalar:
    ``E * sum_e (share of top-k assignments to e) * (mean router probability of e)``.
    """
    layers = list(router_logits) if isinstance(router_logits, (tuple, list)) else [router_logits]
    if not layers:
        raise ValueError("router_logits: expected at least one layer's logits, got an empty sequence")
    stacked = not isinstance(router_logits, (tuple, list))
    for i, t in enumerate(layers):
        name = "router_logits" if stacked else f"router_logits[{i}]"
        _checks.check_tensor(name, t, ndim=2, dtypes=_checks.FLOAT_DTYPES, device=layers[0].device)
        if t.shape[1] != layers[0].shape[1]:
            raise ValueError(
                f"{name}: expected E = {layers[0].shape[1]} experts like router_logits[0], got {t.shape[1]}")
    E = layers[0].shape[1]
    if num_experts is not None and num_experts != E:
        raise ValueError(f"num_experts: {num_experts} does not match the logits' last dimension {E}")
    top_k = _check_top_k(top_k, E, "router_logits")
    if mask is not None:
        _checks.check_tensor("mask", mask, ndim=2)
        n = mask.numel()
        rows = [t.shape[0] for t in layers]
        if isinstance(router_logits, (tuple, list)):
            bad = [r for r in rows if r != n]
            if bad:
                raise ValueError(f"mask: {tuple(mask.shape)} covers {n} tokens but a layer's logits have {bad[0]} rows")
        elif n == 0 or rows[0] % n:
            raise ValueError(
                f"mask: {tuple(mask.shape)} covers {n} tokens; router_logits' {rows[0]} rows are not a multiple")
    return _aux_loss(layers, stacked, top_k, mask, E)


# ---------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------


def _check_top_k(top_k, E: int, logits_name: str) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k: expected an int, got {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k: expected >= 1, got {top_k}")
    if top_k > E:
        raise ValueError(f"top_k: {top_k} exceeds the E = {E} experts of {logits_name}")
    return top_k


def _validate_experts(x, w1, w2, w3, weights, experts) -> None:
    _checks.check_tensor("x", x, ndim=2, dtypes=_checks.FLOAT_DTYPES)
    T, D = x.shape
    dev = x.device
    _checks.check_tensor("w1", w1, ndim=3, dtypes=(x.dtype,), device=dev)
    E, F, D1 = w1.shape
    if D1 != D:
        raise ValueError(f"w1: expected shape (E, F, D) with D = {D} like x, got {tuple(w1.shape)}")
    if E < 1 or F < 1 or D < 1:
        raise ValueError(f"w1: expected E, F, D >= 1, got shape {tuple(w1.shape)}")
    _checks.check_tensor("w3", w3, dtypes=(x.dtype,), shape=(E, F, D), device=dev)
    _checks.check_tensor("w2", w2, dtypes=(x.dtype,), shape=(E, D, F), device=dev)
    _checks.check_tensor("experts", experts, ndim=2, dtypes=_checks.INDEX_DTYPES, device=dev)
    if experts.shape[0] != T:
        raise ValueError(f"experts: expected shape (T, K) with T = {T} like x, got {tuple(experts.shape)}")
    K = experts.shape[1]
    if K < 1 or K > E:
        raise ValueError(f"experts: expected 1 <= K <= E = {E} choices per token, got shape {tuple(experts.shape)}")
    _checks.check_tensor("weights", weights, dtypes=_checks.FLOAT_DTYPES, shape=(T, K), device=dev)
    # Reading the ids needs their values: free on the CPU; on the GPU it would be a host sync,
    # which the contract forbids (the kernels drop out-of-range ids instead).
    # (Also skipped while torch.compile traces: the values are not known then.)
    if dev.type == "cpu" and experts.numel() and not torch.compiler.is_compiling() and not _checks._is_fake(experts):
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"experts: ids must be in [0, E) = [0, {E}), got values in [{lo}, {hi}]")


def _aux_loss(layers, stacked: bool, top_k: int, mask, E: int) -> torch.Tensor:
    """E * sum_e (share of top-k assignments to e) * (mean router probability of e), over
    every layer's (masked) tokens at once: one softmax, one top-k, one one-hot sum."""
    if stacked and mask is not None and layers[0].shape[0] >= mask.numel():
        logits = layers[0]  # (L*T, E): the layers back to back, each masked alike
        keep = (mask.reshape(-1) != 0).repeat(logits.shape[0] // mask.numel())
    else:
        logits = torch.cat(layers) if len(layers) > 1 else layers[0]
        keep = None if mask is None else (mask.reshape(-1) != 0).to(logits.device).repeat(len(layers))
    probs = torch.softmax(logits.float(), dim=-1)  # (R, E)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    assigned = torch.zeros_like(probs).scatter_(1, chosen, 1.0)  # (R, E): 1 per top-k pick
    if keep is not None:
        w = keep.to(device=probs.device, dtype=torch.float32)[:, None]
        probs, assigned = probs * w, assigned * w
        rows = w.sum()
    else:
        rows = torch.tensor(float(probs.shape[0]), device=probs.device)
    return (assigned.sum(dim=0) / rows * (probs.sum(dim=0) / rows)).sum() * E


def _select(device_type: str):
    """The backend module; triton and cuda run their Triton GEMMs on CPU only when interpreted."""
    backend, impl = BACKENDS.pick(device_type)
    if backend in ("triton", "cuda") and device_type == "cpu" and not _backend.triton_runs_on_cpu():
        raise _backend.BackendUnavailableError(
            f"moe: GRIT_BACKEND={backend} on CPU tensors needs TRITON_INTERPRET=1 (the expert GEMMs are Triton)")
    return impl


# ---------------------------------------------------------------------------------------
# routing: torch.library registration
# ---------------------------------------------------------------------------------------


@_dispatch.custom_op("grit::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    # The routing has no Triton GEMM: the triton module's torch ops run on interpreted CPU too.
    impl = BACKENDS.select(router_logits.device.type)
    return impl.route(router_logits.contiguous(), top_k)


@_moe_route_op.register_fake
def _(router_logits, top_k):
    T = router_logits.shape[0]
    return (router_logits.new_empty((T, top_k)),
            router_logits.new_empty((T, top_k), dtype=torch.int32))


def _route_setup_context(ctx, inputs, output):
    router_logits, top_k = inputs
    _weights, experts = output
    ctx.save_for_backward(router_logits, experts)


def _route_backward(ctx, grad_weights, _grad_experts):
    # w = softmax(l[experts]) over the k chosen logits (the full softmax's denominator cancels
    # in the renormalisation), so dl[experts] = w * (g - sum(w * g)) and 0 elsewhere.
    # T * K elements: plain torch ops on every backend.
    router_logits, experts = ctx.saved_tensors
    chosen = router_logits.float().gather(1, experts.long())
    w = torch.softmax(chosen, dim=-1)
    g = grad_weights.float()
    d_chosen = w * (g - (w * g).sum(dim=-1, keepdim=True))
    d_logits = torch.zeros(router_logits.shape, dtype=torch.float32, device=router_logits.device)
    d_logits.scatter_(1, experts.long(), d_chosen)
    return d_logits.to(router_logits.dtype), None


_moe_route_op.register_autograd(_route_backward, setup_context=_route_setup_context)


# ---------------------------------------------------------------------------------------
# experts: torch.library registration
# ---------------------------------------------------------------------------------------


@_dispatch.custom_op("grit::moe_experts", mutates_args=())
def _moe_experts_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (T, D), then what the backward reads: sorted_ids, tile_expert, offsets,
    gu pre-activations, h SwiGLU output; backend-specific shapes, empty where unused)."""
    return _select(x.device.type).forward(x, w1, w2, w3, weights, experts, save)


@_moe_experts_op.register_fake
def _(x, w1, w2, w3, weights, experts, save):
    return x.new_empty(x.shape), *_select(x.device.type).saved_like(x, w1, experts, save)


@torch.library.custom_op("grit::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    sorted_ids: torch.Tensor,
    tile_expert: torch.Tensor,
    offsets: torch.Tensor,
    gu: torch.Tensor,
    h: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw1, dw2, dw3, dweights), each shaped and typed like its input."""
    # Gradients from .sum() arrive expanded (stride 0): the kernels want dense rows.
    return _select(x.device.type).backward(grad_out.contiguous(), x, w1, w2, w3, weights, experts, sorted_ids,
                                           tile_expert, offsets, gu, h)


@_moe_experts_backward_op.register_fake
def _(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w3),
            torch.empty_like(weights))


def _experts_setup_context(ctx, inputs, output):
    x, w1, w2, w3, weights, experts, save = inputs
    _out, sorted_ids, tile_expert, offsets, gu, h = output
    ctx.save_for_backward(x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h)


def _experts_backward(ctx, grad_out, *_unused):
    dx, dw1, dw2, dw3, dweights = _moe_experts_backward_op(grad_out, *ctx.saved_tensors)
    return dx, dw1, dw2, dw3, dweights, None, None


_moe_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup_context)
