"""Mixtral experts on CPU tensors: the cpu backend of ``moe_route`` / ``moe_experts``.

    route(router_logits_TE, top_k) -> weights (T, K), experts (T, K) int32
    forward(x, w1, w2, w3, weights, experts, save) -> out (T, D), sorted_ids, tile_expert, offsets, gu, h
    backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h)
        -> dx, dw1, dw2, dw3, dweights

Legend: T tokens, D hidden size, E experts, F expert hidden size, K experts per token,
TK = T * K slots (slot s = t * K + j). The slots are sorted by expert once (a stable argsort),
so each expert's rows are one contiguous slice: one GEMM per expert and matrix, and the
elementwise SwiGLU (and its derivative) over all rows at once. What the backward needs
(the order, the expert offsets, the pre-activations gu (TK, 2F) and h (TK, F)) is saved by
the forward when ``save``, so the backward recomputes no GEMM of the forward but y = h w2ᵀ
(for the routing weights' gradient). Token outputs are summed in fp32 (fp64 stays fp64).
Expert ids are validated on the host before this runs (CPU: no sync), so every slot is valid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _shared

route = _shared.route


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sort(experts, E: int):
    """(order (TK,) int64 of slots sorted by expert, offsets (E + 1,) int64 host list)."""
    flat = experts.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return order, offsets


def saved_like(x, w1, experts, save: bool):
    TK = experts.numel()
    E, Fh, _ = w1.shape
    i32 = dict(dtype=torch.int32)
    gu = x.new_empty((TK, 2 * Fh)) if save else x.new_empty((0,))
    h = x.new_empty((TK, Fh)) if save else x.new_empty((0,))
    return x.new_empty((TK,), **i32), x.new_empty((0,), **i32), x.new_empty((E + 1,), **i32), gu, h


def _expert_slices(offsets):
    bounds = offsets.tolist()
    return [(e, slice(bounds[e], bounds[e + 1])) for e in range(len(bounds) - 1) if bounds[e + 1] > bounds[e]]


def forward(x, w1, w2, w3, weights, experts, save: bool):
    T, D = x.shape
    E, Fh, _ = w1.shape
    K = experts.shape[1]
    order, offsets = _sort(experts, E)
    tokens = order // K
    xs = x[tokens]  # (TK, D) in sorted order
    gu = x.new_empty((order.numel(), 2 * Fh))
    y = x.new_empty((order.numel(), D))
    for e, rows in _expert_slices(offsets):
        # Into the halves of gu directly: concatenating w1_e and w3_e would copy 2 F D weights per call.
        gu[rows, :Fh] = xs[rows] @ w1[e].T
        gu[rows, Fh:] = xs[rows] @ w3[e].T
    h = F.silu(gu[:, :Fh]) * gu[:, Fh:]
    for e, rows in _expert_slices(offsets):
        torch.matmul(h[rows], w2[e].T, out=y[rows])
    acc = _acc(x.dtype)
    w_sorted = weights.reshape(-1)[order].to(acc)
    out = torch.zeros(T, D, dtype=acc).index_add_(0, tokens, y.to(acc) * w_sorted[:, None])
    saved = (order.to(torch.int32), x.new_empty((0,), dtype=torch.int32), offsets.to(torch.int32))
    if not save:
        return out.to(x.dtype), *saved, x.new_empty((0,)), x.new_empty((0,))
    return out.to(x.dtype), *saved, gu, h


def backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h):
    """Per expert e and its rows (slots s, tokens t):

        y = h w2_eᵀ,  dweights_s = <dout_t, y_s>,  dy = weights_s dout_t
        dw2_e = dyᵀ h,  dh = dy w2_e,  dg = dh u silu'(g),  du = dh silu(g)
        dw1_e = dgᵀ x,  dw3_e = duᵀ x,  dx_t += dg w1_e + du w3_e   (dx summed in fp32)
    """
    T, D = x.shape
    E, Fh, _ = w1.shape
    K = experts.shape[1]
    dt, acc = x.dtype, _acc(x.dtype)
    if experts.numel() == 0:
        return (torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3),
                torch.zeros_like(weights))
    if gu.numel() == 0:  # forward ran without saving (no grad then): recompute
        _, sorted_ids, tile_expert, offsets, gu, h = forward(x, w1, w2, w3, weights, experts, True)
    order = sorted_ids.long()
    tokens = order // K
    xs, dout = x[tokens], grad_out[tokens]
    w_sorted = weights.reshape(-1)[order].to(acc)
    slices = _expert_slices(offsets.long())
    y = torch.empty_like(xs)
    for e, rows in slices:
        torch.matmul(h[rows], w2[e].T, out=y[rows])
    dweights_sorted = (dout.to(acc) * y.to(acc)).sum(dim=1)
    dy = (dout.to(acc) * w_sorted[:, None]).to(dt)
    dw1, dw2, dw3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
    dh = torch.empty_like(h)
    for e, rows in slices:
        dw2[e] = dy[rows].T @ h[rows]
        torch.matmul(dy[rows], w2[e], out=dh[rows])
    g, u, dh = gu[:, :Fh].to(acc), gu[:, Fh:].to(acc), dh.to(acc)
    sig = torch.sigmoid(g)
    dg = (dh * u * sig * (1 + g * (1 - sig))).to(dt)
    du = (dh * g * sig).to(dt)
    dxs = torch.empty_like(xs)
    for e, rows in slices:
        dw1[e] = dg[rows].T @ xs[rows]
        dw3[e] = du[rows].T @ xs[rows]
        torch.matmul(dg[rows], w1[e], out=dxs[rows])
        dxs[rows].addmm_(du[rows], w3[e])
    dx = torch.zeros(T, D, dtype=acc).index_add_(0, tokens, dxs.to(acc))
    dweights = torch.empty(T * K, dtype=acc)
    dweights[order] = dweights_sorted
    return dx.to(dt), dw1, dw2, dw3, dweights.reshape(T, K).to(weights.dtype)
