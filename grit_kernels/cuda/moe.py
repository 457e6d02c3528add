"""Mixtral experts through csrc/moe.cu: the cuda backend of ``moe_route`` / ``moe_experts``.

csrc runs the routing (softmax, top-k, renormalise: one warp per token), the expert sort
(counting sort into BM-padded groups) and the fp32 combine; the grouped GEMMs between them
are the Triton kernels of grit_kernels/triton/moe.py (so CPU tensors need TRITON_INTERPRET=1).
CUDA tensors launch the kernels; CPU tensors run the host build of the same code.
Outside csrc's limits (below) the torch-op versions of grit_kernels/_shared.py run instead.
"""

from __future__ import annotations

import torch

from .. import _backend, _shared
from ._launch import DTYPE_CODES, ptr, stream

MAX_EXPERTS = 64      # the routing kernel keeps a row of probabilities and the top-k in registers
MAX_TOP_K = 8
SORT_MAX_EXPERTS = 256  # the sort keeps per-warp counters of every expert in shared memory


def route(router_logits, top_k: int):
    """-> (weights (T, K) in the logits' dtype, experts (T, K) int32)."""
    logits = router_logits.contiguous()
    T, E = logits.shape
    if E > MAX_EXPERTS or top_k > MAX_TOP_K:
        return _shared.route(logits, top_k)
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


def sort(experts, E: int, block_m: int):
    """csrc's expert sort: (sorted_ids, tile_expert, offsets) as grit_kernels._shared.sort_align."""
    if E > SORT_MAX_EXPERTS:
        return _shared.sort_align(experts, E, block_m)
    C = _backend.C()
    TK = experts.numel()
    n_tiles = _shared.max_tiles(TK, E, block_m)
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


def combine_weighted(y_SD, weights, experts, E: int, K: int, out_dtype):
    """y (TK, D) fp32 -> (T, D) in out_dtype: sum_j weights[t K + j] * y[t K + j] in fp32, j in
    order; weights (TK,) fp32 or None (= 1); slots of out-of-range experts skipped."""
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


def _combine(y_SD, experts, E: int, out_dtype):
    return combine_weighted(y_SD, None, experts, E, experts.shape[1], out_dtype)


def saved_like(x, w1, experts, save: bool):
    from ..triton import moe as tri

    return tri.saved_like(x, w1, experts, save)


def forward(x, w1, w2, w3, weights, experts, save: bool):
    from ..triton import moe as tri

    return tri.forward(x, w1, w2, w3, weights, experts, save, sort=sort, combine=_combine)


def backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h):
    from ..triton import moe as tri

    return tri.backward(grad_out, x, w1, w2, w3, weights, experts, sorted_ids, tile_expert, offsets, gu, h,
                        combine=_combine)
