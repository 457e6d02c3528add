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

Backends (grit_kernels/_backend.py):
  ``torch``  - reference/moe.py (CPU tensors, or forced).
  ``cuda``   - csrc/moe.cu: routing, sort/align and the fp32 combine; the expert GEMMs are the
               Triton kernels of grit_kernels/triton/moe.py.
  ``triton`` - Triton GEMMs; routing, sort/align and combine with torch ops (no host sync).
No host synchronisation on CUDA tensors: out-of-range expert ids are therefore only
rejected for CPU tensors; on the GPU their slots contribute zero.
"""

from __future__ import annotations

import torch

from .. import _backend
from ..reference import moe as ref
from . import _checks
from ._cuda import DTYPE_CODES, ptr, stream

_SUPPORTED = ("torch", "triton", "cuda")
# csrc's routing kernel keeps a row of probabilities and the top-k in registers.
CUDA_MAX_EXPERTS = 64
CUDA_MAX_TOP_K = 8
CUDA_SORT_MAX_EXPERTS = 256  # csrc's sort keeps per-warp counters of every expert in shared memory


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
    return torch.ops.grit.moe_route(router_logits, top_k)


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
    return torch.ops.grit.moe_experts(x, w1, w2, w3, weights, experts.contiguous(), save)[0]


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
    return ref.aux_loss(router_logits, top_k, mask, E)


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


def _select(device_type: str) -> str:
    backend = _backend.select("moe", device_type, _SUPPORTED)
    if backend in ("triton", "cuda") and device_type == "cpu" and not _backend.triton_interpret():
        raise _backend.BackendUnavailableError(
            f"moe: GRIT_BACKEND={backend} on CPU tensors needs TRITON_INTERPRET=1 (the expert GEMMs are Triton)")
    return backend


# ---------------------------------------------------------------------------------------
# routing: torch.library registration
# ---------------------------------------------------------------------------------------


@torch.library.custom_op("grit::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    backend = _backend.select("moe_route", router_logits.device.type, _SUPPORTED)
    logits = router_logits.contiguous()
    T, E = logits.shape
    if backend == "cuda" and E <= CUDA_MAX_EXPERTS and top_k <= CUDA_MAX_TOP_K:
        C = _backend.C()
        weights = torch.empty((T, top_k), dtype=logits.dtype, device=logits.device)
        experts = torch.empty((T, top_k), dtype=torch.int32, device=logits.device)
        args = dict(logits=ptr(logits), weights=ptr(weights), experts=ptr(experts), T=T, E=E, top_k=top_k,
                    dtype=DTYPE_CODES[logits.dtype])
        if logits.is_cuda:
            C.moe_route(**args, stream=stream(logits))
        else:
            C.moe_route_host(**args)
        return weights, experts
    # torch and triton backends (and E > 64 or k > 8): torch ops, no host sync either.
    return ref.route(logits, top_k)


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


def _plan(x, w1, K: int):
    """Tile sizes for the kernels (from static shapes only, so the fake impl agrees)."""
    from ..triton import moe as tri

    T, D = x.shape
    E, F, _ = w1.shape
    return tri.plan(T * K, E, D, F, x.dtype, x.device.type == "cuda")


def _sort(experts, E: int, block_m: int, backend: str):
    if backend == "cuda" and E <= CUDA_SORT_MAX_EXPERTS:
        return _cuda_sort(experts, E, block_m)
    return ref.sort_align(experts, E, block_m)


def _combine(y_SD, experts, E: int, K: int, out_dtype, backend: str):
    if backend == "cuda":
        return _cuda_combine(y_SD, None, experts, E, K, out_dtype)
    return ref.combine(y_SD, K, None, experts, E, out_dtype)


@torch.library.custom_op("grit::moe_experts", mutates_args=())
def _moe_experts_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out (T, D), then what the backward reads: sorted_ids (M,), tile_expert,
    offsets (E + 1,), gu (M, 2F) pre-activations, h (M, F) SwiGLU output; empty on the torch
    backend or when ``save`` is False)."""
    backend = _select(x.device.type)
    if backend == "torch":
        out = ref.experts_forward(x, w1, w2, w3, weights, experts)
        e = x.new_empty((0,), dtype=torch.int32)
        return out, e, e.clone(), e.clone(), x.new_empty((0,)), x.new_empty((0,))
    from ..triton import moe as tri

    T, D = x.shape
    E, F, _ = w1.shape
    K = experts.shape[1]
    x, w1, w2, w3 = x.contiguous(), w1.contiguous(), w2.contiguous(), w3.contiguous()
    cfg = _plan(x, w1, K)
    sorted_ids, tile_expert, offsets = _sort(experts, E, cfg.block_m, backend)
    gu, h = tri.gate_up(x, w1, w3, sorted_ids, tile_expert, K, cfg, save)
    y_SD = tri.down(h, w2, weights.contiguous().reshape(-1), sorted_ids, tile_expert, T * K, cfg)
    out = _combine(y_SD, experts, E, K, x.dtype, backend)
    if not save:  # two distinct empties: custom_op outputs may not alias each other
        gu, h = x.new_empty((0,)), x.new_empty((0,))
    return out, sorted_ids, tile_expert, offsets, gu, h


@_moe_experts_op.register_fake
def _(x, w1, w2, w3, weights, experts, save):
    T, D = x.shape
    E, F, _ = w1.shape
    K = experts.shape[1]
    out = x.new_empty((T, D))
    if _select(x.device.type) == "torch":
        e = x.new_empty((0,), dtype=torch.int32)
        return out, e, e.clone(), e.clone(), x.new_empty((0,)), x.new_empty((0,))
    cfg = _plan(x, w1, K)
    n_tiles = ref.max_tiles(T * K, E, cfg.block_m)
    M = n_tiles * cfg.block_m
    i32 = dict(dtype=torch.int32)
    gu = x.new_empty((M, 2 * F)) if save else x.new_empty((0,))
    h = x.new_empty((M, F)) if save else x.new_empty((0,))
    return out, x.new_empty((M,), **i32), x.new_empty((n_tiles,), **i32), x.new_empty((E + 1,), **i32), gu, h


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
    backend = _select(x.device.type)
    # Gradients from .sum() arrive expanded (stride 0): the kernels want dense rows.
    grad_out = grad_out.contiguous()
    if backend == "torch" or gu.numel() == 0:
        return ref.experts_backward(grad_out, x, w1, w2, w3, weights, experts)
    from ..triton import moe as tri

    T, D = x.shape
    E, F, _ = w1.shape
    K = experts.shape[1]
    TK = T * K
    x, w1, w2, w3 = x.contiguous(), w1.contiguous(), w2.contiguous(), w3.contiguous()
    w_flat = weights.contiguous().reshape(-1)
    cfg = _plan(x, w1, K)
    # d(gate, up) per sorted row, and the routing weights' gradient as per-F-tile partial dots.
    dgu, dw_part = tri.down_backward(grad_out, w2, gu, w_flat, sorted_ids, tile_expert, K, cfg)
    row_dw = dw_part.sum(dim=0)  # fixed order over F tiles: deterministic
    dweights = torch.zeros(TK + 1, dtype=torch.float32, device=x.device)
    dweights.scatter_(0, sorted_ids.long(), row_dw)  # padding rows land on the scratch slot TK
    dweights = dweights[:TK].reshape(T, K).to(weights.dtype)
    dxs_SD = tri.dx(dgu, w1, w3, sorted_ids, tile_expert, TK, cfg)
    dx = _combine(dxs_SD, experts, E, K, x.dtype, backend)
    dw1, dw3 = tri.dw_gate_up(dgu, x, sorted_ids, offsets, K, cfg)
    dw2 = tri.dw_down(grad_out, h, w_flat, sorted_ids, offsets, K, cfg)
    return dx, dw1, dw2, dw3, dweights


@_moe_experts_backward_op.register_fake
def _(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h):
    return (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(w2), torch.empty_like(w3),
            torch.empty_like(weights))


def _experts_setup_context(ctx, inputs, output):
    x, w1, w2, w3, weights, experts, save = inputs
    _out, sorted_ids, tile_expert, offsets, gu, h = output
    ctx.save_for_backward(x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h)


def _experts_backward(ctx, grad_out, *_unused):
    dx, dw1, dw2, dw3, dweights = torch.ops.grit.moe_experts_backward(grad_out, *ctx.saved_tensors)
    return dx, dw1, dw2, dw3, dweights, None, None


_moe_experts_op.register_autograd(_experts_backward, setup_context=_experts_setup_context)


# ---------------------------------------------------------------------------------------
# csrc (cuda backend): device launches, or the host build on CPU tensors
# ---------------------------------------------------------------------------------------


def _cuda_sort(experts, E: int, block_m: int):
    C = _backend.C()
    TK = experts.numel()
    n_tiles = ref.max_tiles(TK, E, block_m)
    dev = experts.device
    sorted_ids = torch.empty(n_tiles * block_m, dtype=torch.int32, device=dev)
    tile_expert = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    offsets = torch.empty(E + 1, dtype=torch.int32, device=dev)
    args = dict(experts=ptr(experts), sorted_ids=ptr(sorted_ids), tile_expert=ptr(tile_expert),
                offsets=ptr(offsets), TK=TK, E=E, block_m=block_m, n_tiles=n_tiles)
    if experts.is_cuda:
        C.moe_sort(**args, stream=stream(experts))
    else:
        C.moe_sort_host(**args)
    return sorted_ids, tile_expert, offsets


def _cuda_combine(y_SD, weights, experts, E: int, K: int, out_dtype):
    """y (TK, D) fp32 -> (T, D) in out_dtype; weights (TK,) fp32 or None (= 1)."""
    C = _backend.C()
    TK, D = y_SD.shape
    y_SD = y_SD.contiguous()
    out = torch.empty((TK // K, D), dtype=out_dtype, device=y_SD.device)
    args = dict(y=ptr(y_SD), weights=ptr(weights), experts=ptr(experts), out=ptr(out), T=TK // K, K=K, D=D, E=E,
                dtype=DTYPE_CODES[out_dtype])
    if y_SD.is_cuda:
        C.moe_combine(**args, stream=stream(y_SD))
    else:
        C.moe_combine_host(**args)
    return out
