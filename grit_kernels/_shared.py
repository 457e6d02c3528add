"""Small plain-PyTorch steps that several backends run around their kernels.

Device-agnostic torch ops with no host synchronisation, so that a CUDA launcher can use
them as well as the CPU backend. They are production code; the oracles in
``grit_kernels/reference`` are written separately and do not import them.

Shapes: B rows, S padded length, D hidden size; T tokens, E experts, K = top_k,
TK = T * K routing slots (slot t * K + j is token t's j-th expert), BM rows per tile.
"""

from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's eps


# ---------------------------------------------------------------------------------------
# mean_pool
# ---------------------------------------------------------------------------------------


def pool_layout(hidden, cu_seqlens) -> tuple[int, int, int, int]:
    """(B rows, S padded length (0 when packed), D, T tokens) of mean_pool's hidden."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, 0, hidden.shape[1], hidden.shape[0]
    B, S, D = hidden.shape
    return B, S, D, B * S


def padded_weights(mask_BS: torch.Tensor, weighted: bool) -> torch.Tensor:
    """(B, S) fp32 token weights: 1 per pooled token, or its rank 1..n (GritLM's weightedmean).

    B*S floats next to hidden's B*S*D elements, so preparing them in torch is noise."""
    w = (mask_BS != 0).to(torch.float32)
    return (w * torch.cumsum(w, dim=1) if weighted else w).contiguous()


def packed_denominators(cu_seqlens: torch.Tensor, skip: torch.Tensor, weighted: bool) -> torch.Tensor:
    """(B,) fp32 sum of each packed row's token weights: n or n(n+1)/2 for n pooled tokens."""
    n = (cu_seqlens[1:] - cu_seqlens[:-1] - skip).clamp_min(0).to(torch.float64)
    return (n * (n + 1) / 2 if weighted else n).to(torch.float32)


def grad_of_mean(grad_out: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, normalize: bool) -> torch.Tensor:
    """(B, D) fp32 gradient w.r.t. the unnormalised mean y.

    With ``normalize``, ``o = y / max(|y|, eps)`` and ``dy = (g - o (o . g)) / |y|`` (for
    ``|y| > eps``; below it the division by eps is linear, so ``dy = g / eps``)."""
    g = grad_out.float()
    if not normalize:
        return g.contiguous()
    d = norm.clamp_min(NORM_EPS)[:, None]
    return torch.where(norm[:, None] > NORM_EPS, (g - out * (out * g).sum(dim=1, keepdim=True)) / d,
                       g / d).contiguous()


# ---------------------------------------------------------------------------------------
# moe
# ---------------------------------------------------------------------------------------


def route(router_logits_TE: torch.Tensor, top_k: int):
    """Mixtral's routing in torch ops: softmax in fp32, top-k by repeated argmax (ties go to
    the lowest index: argmax returns the first maximum), renormalise, cast back.

    -> (weights (T, K) in the logits' dtype, experts (T, K) int32). K argmax passes over
    (T, E) instead of a sort: Mixtral's K = 2."""
    probs = torch.softmax(router_logits_TE.float(), dim=-1)
    left = probs.clone()
    picks = []
    for _ in range(top_k):
        e = left.argmax(dim=-1, keepdim=True)
        picks.append(e)
        left.scatter_(1, e, float("-inf"))
    experts = torch.cat(picks, dim=1)
    top = probs.gather(1, experts)
    weights = top / top.sum(dim=-1, keepdim=True)
    return weights.to(router_logits_TE.dtype), experts.to(torch.int32)


def max_tiles(TK: int, E: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / BM) for TK slots over E experts (no sync needed)."""
    return -(-TK // block_m) + E


def sort_align(experts_TK: torch.Tensor, E: int, block_m: int):
    """Slots grouped by expert, each expert's group padded to a multiple of BM, no host sync.

    Returns
      sorted_ids   int32 (max_tiles * BM,): slot at each sorted row, TK for padding rows;
                   within an expert, slots in increasing order (deterministic);
      tile_expert  int32 (max_tiles,): expert of each BM-row tile, -1 past the last tile;
      offsets      int32 (E + 1,): first sorted row of each expert (padded prefix sums).
    Slots with an expert id outside [0, E) are left out.
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


def combine(y_SD: torch.Tensor, experts_TK: torch.Tensor, E: int, out_dtype) -> torch.Tensor:
    """out[t] = sum_j y[t * K + j] in fp32, j = 0, 1, ..., K - 1 in that order (deterministic),
    slots of out-of-range experts skipped, cast to ``out_dtype``. y (TK, D) -> (T, D)."""
    T, K = experts_TK.shape
    y = y_SD.float().reshape(T, K, -1)
    ok = ((experts_TK >= 0) & (experts_TK < E))[..., None]
    out = torch.zeros(T, y.shape[-1], dtype=torch.float32, device=y.device)
    for j in range(K):
        out = out + torch.where(ok[:, j], y[:, j], 0.0)
    return out.to(out_dtype)
