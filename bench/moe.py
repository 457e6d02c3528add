"""Mixtral experts (moe_experts) vs the HF expert loop and torch._grouped_mm, same run.

GPU: Mixtral 8x7B's expert dims (D 4096, F 14336, E 8, K 2), bf16, T = 1, 16, 256, 4096,
16384 tokens with Mixtral-like random routing, forward and forward+backward, on the cuda
(csrc sort/combine) and triton backends. FLOPs: 2 * T * K * D * F * 3 forward (three GEMMs),
3x that for forward+backward. The T = 1 decode case also reports the time to read the two
chosen experts' weights (3 * D * F * 2 bytes each) at the card's bandwidth, its floor.
CPU: a small fp32 shape on the torch (reference) backend vs the HF loop.
"""

from __future__ import annotations

import torch

from grit_kernels import moe_experts, moe_route

from .common import Case, Skipped, roofline, with_backend

MIXTRAL = dict(D=4096, F=14336, E=8, K=2)
TOKENS = (1, 16, 256, 4096, 16384)
QUICK_TOKENS = (1, 256, 4096)
GPU_BYTES = 80e9  # skip what would not fit on an 80 GB card


def hf_experts(w1, w2, w3):
    """transformers' MixtralExperts (the eager per-expert loop) holding the same weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    E, F, D = w1.shape
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    with torch.device("meta"):
        mod = MixtralExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(torch.cat([w1, w3], dim=1), requires_grad=w1.requires_grad)
    mod.down_proj = torch.nn.Parameter(w2, requires_grad=w2.requires_grad)
    return mod


def grouped_mm_experts(x, w13_t, w2_t, weights, experts):
    """The experts with torch._grouped_mm: sort the slots by expert, two grouped GEMMs, weight,
    scatter-add. w13_t (E, D, 2F) and w2_t (E, F, D) are transposed views, the layout it wants."""
    T, D = x.shape
    K = experts.shape[1]
    E = w13_t.shape[0]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ones = torch.ones_like(flat, dtype=torch.int64)
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat.long(), ones)
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (bincount would sync with the host)
    tok = order // K
    gu = torch._grouped_mm(x[tok], w13_t, offs=offs)
    g, u = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(g) * u, w2_t, offs=offs)
    y = y.float() * weights.reshape(-1)[order, None].float()
    return torch.zeros(T, D, dtype=torch.float32, device=x.device).index_add_(0, tok, y).to(x.dtype)


def _mixtral_routing(T, E, K, device, gen):
    logits = torch.randn(T, E, device=device, generator=gen, dtype=torch.float32)
    return moe_route(logits.to(torch.bfloat16), top_k=K)


def _fwd_bwd(fn, leaves):
    def call():
        for t in leaves:
            t.grad = None
        fn().float().sum().backward()
    return call


def _memory_estimate(T, D, F, E, K, bwd: bool) -> float:
    """Bytes our op needs at peak (bf16), weights and their gradients included."""
    M = T * K + E * 128
    weights = 3 * E * D * F * 2
    act = M * 3 * F * 2 + T * K * D * 4 + T * D * 2 * 2
    if bwd:
        return 2 * weights + 2 * act + M * 2 * F * 2 + T * K * D * 4
    return weights + act


def _hf_memory_estimate(T, D, F, E, K, bwd: bool) -> float:
    weights = 3 * E * D * F * 2
    act = T * K * (3 * F + 2 * D) * 2  # per-expert gate_up, activation, outputs kept by autograd
    return (2 * weights + 2 * act) if bwd else weights + act / K


def gpu_cases(device, quick: bool):
    out = []
    D, F, E, K = MIXTRAL["D"], MIXTRAL["F"], MIXTRAL["E"], MIXTRAL["K"]
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16
    scale = D ** -0.5
    w1 = (torch.randn(E, F, D, device=device, generator=gen) * scale).to(dtype)
    w3 = (torch.randn(E, F, D, device=device, generator=gen) * scale).to(dtype)
    w2 = (torch.randn(E, D, F, device=device, generator=gen) * F ** -0.5).to(dtype)
    leaves_w = [t.clone().requires_grad_() for t in (w1, w2, w3)]
    hf = hf_experts(w1, w2, w3)
    hf_g = hf_experts(*[t.detach().clone().requires_grad_() for t in (w1, w2, w3)])
    has_gmm = hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device)[0] >= 9
    w13_t = torch.cat([w1, w3], dim=1).transpose(-2, -1)
    w2_t = w2.transpose(-2, -1)
    w13_tg = w13_t.detach().clone().requires_grad_()
    w2_tg = w2_t.detach().clone().requires_grad_()
    bandwidth = roofline(str(device))["bandwidth"]
    for T in (QUICK_TOKENS if quick else TOKENS):
        shape = f"T={T} D={D} F={F} E={E} K={K} bf16"
        x = torch.randn(T, D, device=device, generator=gen).to(dtype)
        weights, experts = _mixtral_routing(T, E, K, device, gen)
        flops = 2.0 * T * K * D * F * 3
        extra = {}
        if T == 1 and bandwidth:
            floor_s = 2 * 3 * D * F * 2 / bandwidth
            extra = dict(weight_read_us=floor_s * 1e6, bandwidth_GBps=bandwidth / 1e9)
        hf_fwd = (lambda x=x, w=weights, e=experts: hf(x, e.long(), w))
        for backend in ("cuda", "triton"):
            fwd = with_backend(backend, lambda x=x, w=weights, e=experts: moe_experts(x, w1, w2, w3, w, e))
            # T = 1: `bytes` is the two experts' weights, so GB/s and the floor compare directly.
            out.append(Case("moe_experts fwd", shape, backend, fwd, baseline=hf_fwd, baseline_name="HF expert loop",
                            flops=flops, bytes=2 * 3 * D * F * 2 if T == 1 else None, extra=dict(extra)))
        if has_gmm:
            out.append(Case("moe_experts fwd", shape, "cuda",
                            with_backend("cuda", lambda x=x, w=weights, e=experts: moe_experts(x, w1, w2, w3, w, e)),
                            baseline=lambda x=x, w=weights, e=experts: grouped_mm_experts(x, w13_t, w2_t, w, e),
                            baseline_name="torch._grouped_mm", flops=flops))
        else:
            out.append(Skipped("moe_experts fwd", shape, "torch._grouped_mm baseline needs sm_90 and torch >= 2.8"))

        need = max(_memory_estimate(T, D, F, E, K, True), _hf_memory_estimate(T, D, F, E, K, True))
        bwd_fits = need < GPU_BYTES * 0.85
        if not bwd_fits:
            out.append(Skipped("moe_experts fwd+bwd", shape, "would not fit in 80 GB with the HF baseline"))
            continue
        xg = x.clone().requires_grad_()
        wg = weights.clone().requires_grad_()
        ours_leaves = [xg, wg, *leaves_w]
        hf_leaves = [xg, wg, *hf_g.parameters()]
        hf_step = _fwd_bwd(lambda xg=xg, wg=wg, e=experts: hf_g(xg, e.long(), wg), hf_leaves)
        for backend in ("cuda", "triton"):
            step = _fwd_bwd(with_backend(backend, lambda xg=xg, wg=wg, e=experts:
                                         moe_experts(xg, leaves_w[0], leaves_w[1], leaves_w[2], wg, e)), ours_leaves)
            out.append(Case("moe_experts fwd+bwd", shape, backend, step, baseline=hf_step,
                            baseline_name="HF expert loop", flops=3 * flops))
        if has_gmm:
            gmm_step = _fwd_bwd(lambda xg=xg, wg=wg, e=experts: grouped_mm_experts(xg, w13_tg, w2_tg, wg, e),
                                [xg, wg, w13_tg, w2_tg])
            step = _fwd_bwd(with_backend("cuda", lambda xg=xg, wg=wg, e=experts:
                                         moe_experts(xg, leaves_w[0], leaves_w[1], leaves_w[2], wg, e)), ours_leaves)
            out.append(Case("moe_experts fwd+bwd", shape, "cuda", step, baseline=gmm_step,
                            baseline_name="torch._grouped_mm", flops=3 * flops))
    # Routing itself (csrc vs transformers' router arithmetic), the largest T.
    T = 16384
    logits = torch.randn(T, E, device=device, generator=gen).to(dtype)

    def hf_router():
        p = torch.softmax(logits.float(), dim=-1)
        v, i = torch.topk(p, K, dim=-1)
        return (v / v.sum(dim=-1, keepdim=True)).to(dtype), i

    out.append(Case("moe_route", f"T={T} E={E} K={K} bf16", "cuda", with_backend("cuda", lambda: moe_route(logits, K)),
                    baseline=hf_router, baseline_name="HF router (torch ops)", bytes=T * E * 2 + T * K * 6))
    return out


def cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        return gpu_cases(device, quick)
    out = []
    gen = torch.Generator().manual_seed(0)
    T, D, F, E, K = 64, 128, 256, 8, 2
    x = torch.randn(T, D, generator=gen)
    w1, w3 = torch.randn(E, F, D, generator=gen) * 0.1, torch.randn(E, F, D, generator=gen) * 0.1
    w2 = torch.randn(E, D, F, generator=gen) * 0.1
    weights, experts = moe_route(torch.randn(T, E, generator=gen), top_k=K)
    hf = hf_experts(w1, w2, w3)
    shape = f"T={T} D={D} F={F} E={E} K={K} fp32"
    out.append(Case("moe_experts fwd", shape, "cpu", with_backend("cpu", lambda: moe_experts(x, w1, w2, w3, weights,
                                                                                               experts)),
                    baseline=lambda: hf(x, experts.long(), weights), baseline_name="HF expert loop",
                    flops=2.0 * T * K * D * F * 3))
    for T in TOKENS:
        out.append(Skipped("moe_experts fwd/fwd+bwd", f"T={T} D=4096 F=14336 E=8 K=2 bf16 (cuda, triton, "
                           "HF loop, torch._grouped_mm)", "needs a CUDA device"))
    return out
