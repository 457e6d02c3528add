"""Masked mean pooling vs GritLM's eager pooling, ``sum(h * m) / m.sum()``.

GPU: B=64, S=512, D=4096 bf16 (padded, GritLM's layout) and a packed batch of mixed
lengths, forward and forward+backward, on the cuda and triton backends.
CPU: a small shape on the torch (reference) backend and csrc's host build.
Bytes counted: the pooled tokens of hidden (masked ones need not be read) + the fp32 output.
"""

from __future__ import annotations

import torch

from grit_kernels import mean_pool

from .common import Case, Skipped, with_backend


def eager_pool(h, m):
    """gritlm.GritLM.pooling, 'mean' (the baseline)."""
    m = m.to(h.dtype)
    return (h * m.unsqueeze(-1)).sum(dim=1) / m.sum(dim=1, keepdim=True)


def _padded(B, S, D, dtype, device, gen):
    h = torch.randn(B, S, D, dtype=dtype, device=device, generator=gen)
    lengths = torch.randint(S // 2, S + 1, (B,), generator=gen, device=device)
    instr = torch.randint(0, 16, (B,), generator=gen, device=device)
    pos = torch.arange(S, device=device)
    m = ((pos[None] < lengths[:, None]) & (pos[None] >= instr[:, None])).to(torch.int64)
    return h, m


def _fwd_bwd(fn, h):
    def call():
        h.grad = None
        fn().sum().backward()
    return call


def cases(device: torch.device, quick: bool):
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    if device.type == "cuda":
        B, S, D = (16, 256, 4096) if quick else (64, 512, 4096)
        dtype = torch.bfloat16
        h, m = _padded(B, S, D, dtype, device, gen)
        pooled = int(m.sum())
        nbytes = pooled * D * h.element_size() + B * D * 4
        hg = h.clone().requires_grad_()
        for backend in ("cuda", "triton"):
            shape = f"B={B} S={S} D={D} bf16"
            out.append(Case("mean_pool fwd", shape, backend, with_backend(backend, lambda: mean_pool(h, m)),
                            baseline=lambda: eager_pool(h, m), baseline_name="eager gritlm", bytes=nbytes))
            out.append(Case("mean_pool fwd+bwd", shape, backend,
                            _fwd_bwd(with_backend(backend, lambda: mean_pool(hg, m)), hg),
                            baseline=_fwd_bwd(lambda: eager_pool(hg, m), hg), baseline_name="eager gritlm",
                            bytes=nbytes + B * S * D * h.element_size()))
        # Packed: the same tokens without padding; baseline pools the padded batch.
        lengths = m.sum(dim=1)
        flat = h[m.bool()]
        cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
        cu[1:] = torch.cumsum(lengths, 0).to(torch.int32)
        for backend in ("cuda", "triton"):
            out.append(Case("mean_pool fwd packed", f"T={flat.shape[0]} B={B} D={D} bf16", backend,
                            with_backend(backend, lambda: mean_pool(flat, cu_seqlens=cu)),
                            baseline=lambda: eager_pool(h, m), baseline_name="eager gritlm (padded)",
                            bytes=nbytes))
    else:
        B, S, D = (4, 64, 256) if quick else (8, 256, 1024)
        h, m = _padded(B, S, D, torch.float32, device, gen)
        nbytes = int(m.sum()) * D * 4 + B * D * 4
        shape = f"B={B} S={S} D={D} fp32"
        out.append(Case("mean_pool fwd", shape, "cpu", with_backend("cpu", lambda: mean_pool(h, m)),
                        baseline=lambda: eager_pool(h, m), baseline_name="eager gritlm", bytes=nbytes))
        try:
            from grit_kernels import _backend

            _backend.C()
            out.append(Case("mean_pool fwd", shape, "cuda (host build)", with_backend("cuda", lambda: mean_pool(h, m)),
                            baseline=lambda: eager_pool(h, m), baseline_name="eager gritlm", bytes=nbytes))
        except Exception as e:
            out.append(Skipped("mean_pool fwd", shape, f"cuda host build unavailable: {e}"))
        for what in ("B=64 S=512 D=4096 bf16 (cuda, triton)", "packed T~24k D=4096 bf16 (cuda, triton)"):
            out.append(Skipped("mean_pool fwd/fwd+bwd", what, "needs a CUDA device"))
    return out
