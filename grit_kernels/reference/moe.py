"""Mixtral mixture-of-experts in plain PyTorch: the oracle for tests and the reference backend.

Written for clarity, not speed. Semantics are transformers' Mixtral
(models/mixtral/modeling_mixtral.py: MixtralTopKRouter, MixtralExperts, load_balancing_loss_func).

Legend: T tokens, D hidden size, E experts, F expert hidden size, K experts per token (top_k),
TK = T * K routing slots (slot s = t * K + j is the j-th choice of token t), M rows of the
expert-sorted layout (a multiple of BLOCK_M), BM = BLOCK_M.

Routing ties: ``torch.topk`` leaves the order of equal values to its implementation (on CPU
it is not lowest-index-first: topk([.1, .3, .3, .3, 0, .3], 3) picks experts 3, 5, 2). We
break ties by the lowest expert index, the rule a stable descending sort gives; without
exact ties the result is the same as ``torch.topk``'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(router_logits_TE: torch.Tensor, top_k: int):
    """Softmax in fp32 over E, top-k (ties: lowest index first), renormalise, cast back.

    Returns (weights_TK in router_logits' dtype, experts_TK int32).
    """
    probs_TE = torch.softmax(router_logits_TE.float(), dim=-1)
    values, order = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    top_TK, experts_TK = values[:, :top_k], order[:, :top_k]
    weights_TK = top_TK / top_TK.sum(dim=-1, keepdim=True)
    return weights_TK.to(router_logits_TE.dtype), experts_TK.to(torch.int32)


def experts_forward(x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK, experts_TK):
    """sum_j weights[t, j] * w2_e (silu(w1_e x_t) * (w3_e x_t)), e = experts[t, j].

    Each expert's rows are computed in the inputs' dtype (like the HF loop); the k weighted
    expert outputs of a token are summed in fp32 and cast back. Slots whose expert id is
    outside [0, E) contribute nothing. Differentiable through autograd.
    """
    T, D = x_TD.shape
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    E = w1_EFD.shape[0]
    K = experts_TK.shape[1]
    flat_experts = experts_TK.reshape(-1).long()
    flat_weights = weights_TK.reshape(-1)
    tokens = torch.arange(T * K, device=x_TD.device) // K
    out_TD = torch.zeros(T, D, dtype=acc, device=x_TD.device)
    for e in range(E):
        slots = (flat_experts == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        t = tokens[slots]
        x_e = x_TD[t]
        h = F.silu(x_e @ w1_EFD[e].t()) * (x_e @ w3_EFD[e].t())
        y = (h @ w2_EDF[e].t()).to(acc) * flat_weights[slots, None].to(acc)
        out_TD = out_TD.index_add(0, t, y)
    return out_TD.to(x_TD.dtype)



def experts_backward(grad_out_TD, x_TD, w1_EFD, w2_EDF, w3_EFD, weights_TK, experts_TK):
    """Hand-written gradients of ``experts_forward`` (the reference backend's backward; tests
    check it against autograd through ``experts_forward``). Per expert e and its slots s:

        g = x w1_e^T, u = x w3_e^T, a = silu(g) u, y = a w2_e^T      (y: unweighted output)
        dweights_s = <dout_t, y_s>,  dy_s = weights_s dout_t
        dw2_e = dy^T a,  da = dy w2_e,  dg = da u silu'(g),  du = da silu(g)
        dw1_e = dg^T x,  dw3_e = du^T x,  dx_t += dg w1_e + du w3_e   (dx summed in fp32)

    Returns (dx, dw1, dw2, dw3, dweights) shaped and typed like the inputs.
    """
    T, D = x_TD.shape
    E = w1_EFD.shape[0]
    K = experts_TK.shape[1]
    dt = x_TD.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32  # fp32 sums, fp64 stays fp64
    flat_experts = experts_TK.reshape(-1).long()
    flat_weights = weights_TK.reshape(-1).to(acc)
    tokens = torch.arange(T * K, device=x_TD.device) // K
    dx = torch.zeros(T, D, dtype=acc, device=x_TD.device)
    dw1, dw2, dw3 = torch.zeros_like(w1_EFD), torch.zeros_like(w2_EDF), torch.zeros_like(w3_EFD)
    dweights = torch.zeros(T * K, dtype=acc, device=x_TD.device)
    for e in range(E):
        slots = (flat_experts == e).nonzero().flatten()
        if slots.numel() == 0:
            continue
        t = tokens[slots]
        x_e, dout = x_TD[t], grad_out_TD[t]
        g, u = x_e @ w1_EFD[e].t(), x_e @ w3_EFD[e].t()
        a = F.silu(g) * u
        y = a @ w2_EDF[e].t()
        dweights[slots] = (dout.to(acc) * y.to(acc)).sum(dim=1)
        dy = (dout.to(acc) * flat_weights[slots, None]).to(dt)
        dw2[e] = dy.t() @ a
        da = (dy @ w2_EDF[e]).to(acc)
        gf, uf = g.to(acc), u.to(acc)
        sig = torch.sigmoid(gf)
        dg = (da * uf * sig * (1 + gf * (1 - sig))).to(dt)
        du = (da * gf * sig).to(dt)
        dw1[e] = dg.t() @ x_e
        dw3[e] = du.t() @ x_e
        dx.index_add_(0, t, (dg @ w1_EFD[e] + du @ w3_EFD[e]).to(acc))
    return dx.to(dt), dw1, dw2, dw3, dweights.reshape(T, K).to(weights_TK.dtype)

def aux_loss(router_logits, top_k: int, mask=None, num_experts: int | None = None):
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6), fp32 scalar.

    ``router_logits``: a tuple/list of per-layer (T, E) logits, or one (L*T, E) tensor (the
    layers concatenated). ``mask``: (B, S) with B*S = T, nonzero = real token, applied to
    every layer. ``E * sum_e (fraction of top-k assignments to e) * (mean probability of e)``.
    """
    layers = list(router_logits) if isinstance(router_logits, (tuple, list)) else None
    if layers is None:
        logits = router_logits
        if mask is not None:
            n_layers = logits.shape[0] // mask.numel()
            layers = list(logits.split(mask.numel())) if n_layers > 0 else [logits]
        else:
            layers = [logits]
    E = num_experts if num_experts is not None else layers[0].shape[-1]
    device = layers[0].device
    tokens_sum = torch.zeros(E, dtype=torch.float32, device=device)
    probs_sum = torch.zeros(E, dtype=torch.float32, device=device)
    rows = torch.zeros((), dtype=torch.float32, device=device)
    m = None if mask is None else (mask.reshape(-1) != 0).to(device=device, dtype=torch.float32)
    for logits in layers:
        probs = torch.softmax(logits.float(), dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        w = torch.ones(chosen.shape[0], device=device) if m is None else m
        tokens_sum = tokens_sum + torch.zeros(E, device=device).scatter_add_(
            0, chosen.reshape(-1), w.repeat_interleave(top_k))
        probs_sum = probs_sum + (probs * w[:, None]).sum(dim=0)
        rows = rows + w.sum()
    return (tokens_sum / rows * (probs_sum / rows)).sum() * E


# ---------------------------------------------------------------------------------------
# the op's reference backend (GRIT_BACKEND=reference): route / forward / backward
# ---------------------------------------------------------------------------------------


def saved_like(x, w1, experts, save: bool):
    e = x.new_empty((0,), dtype=torch.int32)
    return e, e.clone(), e.clone(), x.new_empty((0,)), x.new_empty((0,))


def forward(x, w1, w2, w3, weights, experts, save: bool):
    """(out, then five empty tensors: the backward recomputes everything)."""
    return experts_forward(x, w1, w2, w3, weights, experts), *saved_like(x, w1, experts, save)


def backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h):
    return experts_backward(grad_out, x, w1, w2, w3, weights, experts)


# ---------------------------------------------------------------------------------------
# The expert-sorted layout, spelled out: the oracle for csrc's moe_sort and moe_combine
# ---------------------------------------------------------------------------------------


def sort_align(experts_TK: torch.Tensor, E: int, block_m: int):
    """Slots grouped by expert, each group padded to a multiple of BM, written with loops.

    Returns (sorted_ids (n_tiles * BM,) int32: the slot of each sorted row, TK on padding
    rows, slots increasing within an expert; tile_expert (n_tiles,) int32: each tile's
    expert, -1 past the last used tile; offsets (E + 1,) int32: each expert's first row),
    with n_tiles = ceil(TK / BM) + E, the bound that needs no count. Out-of-range ids are
    left out.
    """
    flat = experts_TK.reshape(-1).tolist()
    TK = len(flat)
    n_tiles = -(-TK // block_m) + E
    sorted_ids = [TK] * (n_tiles * block_m)
    tile_expert = [-1] * n_tiles
    offsets = [0] * (E + 1)
    row = 0
    for e in range(E):
        offsets[e] = row
        slots = [s for s in range(TK) if flat[s] == e]
        for i, s in enumerate(slots):
            sorted_ids[row + i] = s
        tiles = -(-len(slots) // block_m)
        for t in range(tiles):
            tile_expert[row // block_m + t] = e
        row += tiles * block_m
    offsets[E] = row
    as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=experts_TK.device)  # noqa: E731
    return as_i32(sorted_ids), as_i32(tile_expert), as_i32(offsets)


def combine(y_SD: torch.Tensor, top_k: int, weights_TK=None, experts_TK=None, num_experts: int = 0,
            out_dtype=None):
    """out[t] = sum_j weights[t, j] * y[t * K + j] in fp32 (weights default to 1), slots of
    out-of-range experts skipped (when experts_TK is given), cast to ``out_dtype``."""
    TK, D = y_SD.shape
    T = TK // top_k
    out = torch.zeros(T, D, dtype=torch.float32, device=y_SD.device)
    for j in range(top_k):  # fixed order: j = 0, 1, ..., K - 1
        term = y_SD[j::top_k].float()
        if weights_TK is not None:
            term = term * weights_TK.reshape(T, top_k)[:, j:j + 1].float()
        if experts_TK is not None:
            e = experts_TK.reshape(T, top_k)[:, j:j + 1]
            term = torch.where((e >= 0) & (e < num_experts), term, 0.0)
        out = out + term
    return out.to(out_dtype or y_SD.dtype)
