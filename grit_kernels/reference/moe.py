"""Mixtral mixture-of-experts in plain PyTorch: the oracle for tests and the CPU path.

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
    """Hand-written gradients of ``experts_forward`` (the torch backend's backward; tests
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
# The expert-sorted layout (the oracle for csrc's moe_sort and the device-side torch path)
# ---------------------------------------------------------------------------------------


def max_tiles(TK: int, E: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BM) for TK slots over E experts (no sync needed)."""
    return -(-TK // block_m) + E


def sort_align(experts_TK: torch.Tensor, E: int, block_m: int):
    """Slots grouped by expert, each expert's group padded to a multiple of BM.

    Returns
      sorted_ids_M   int32 (max_tiles * BM,): slot at each sorted row, TK for padding rows;
                     within an expert, slots in increasing order (deterministic);
      tile_expert    int32 (max_tiles,): expert of each BM-row tile, -1 past the last tile;
      offsets_E1     int32 (E + 1,): first sorted row of each expert (padded prefix sums).
    Slots with an expert id outside [0, E) are left out. No host synchronisation.
    """
    flat = experts_TK.reshape(-1).long()
    TK = flat.numel()
    device = flat.device
    n_tiles = max_tiles(TK, E, block_m)
    valid = (flat >= 0) & (flat < E)
    key = torch.where(valid, flat, torch.full_like(flat, E))  # invalid ids sort last
    counts = torch.zeros(E + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))[:E]
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(E + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    starts = torch.zeros(E + 1, dtype=torch.int64, device=device)
    starts[1:E + 1] = torch.cumsum(counts, 0)
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    rank = torch.arange(TK, device=device) - starts[sorted_key.clamp_max(E - 1)]
    dest = torch.where(sorted_key < E, offsets[sorted_key.clamp_max(E - 1)] + rank,
                       torch.full_like(rank, n_tiles * block_m))  # dropped: a scratch row past the end
    sorted_ids = torch.full((n_tiles * block_m + 1,), TK, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    tile_start = torch.arange(n_tiles, device=device) * block_m
    tile_expert = torch.searchsorted(offsets[1:].contiguous(), tile_start, right=True)
    tile_expert = torch.where(tile_expert < E, tile_expert, torch.full_like(tile_expert, -1))
    return sorted_ids[:-1].contiguous(), tile_expert.to(torch.int32), offsets.to(torch.int32)


def combine(y_SD: torch.Tensor, top_k: int, weights_TK=None, experts_TK=None, num_experts: int = 0,
            out_dtype=None):
    """out[t] = sum_j weights[t, j] * y[t * K + j] in fp32 (weights default to 1), slots of
    out-of-range experts skipped (when experts_TK is given), cast to ``out_dtype``."""
    TK, D = y_SD.shape
    y = y_SD.float().reshape(TK // top_k, top_k, D)
    if weights_TK is not None:
        y = y * weights_TK.float().reshape(-1, top_k, 1)
    if experts_TK is not None:
        ok = (experts_TK >= 0) & (experts_TK < num_experts)
        y = torch.where(ok.reshape(-1, top_k, 1), y, torch.zeros((), dtype=y.dtype, device=y.device))
    out = torch.zeros(TK // top_k, D, dtype=torch.float32, device=y.device)
    for j in range(top_k):  # fixed order: j = 0, 1, ..., K - 1
        out = out + y[:, j]
    return out.to(out_dtype or y_SD.dtype)
