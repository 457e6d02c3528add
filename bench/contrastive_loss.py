"""In-batch contrastive loss and GradCache vs plain PyTorch, time and peak memory.

GPU: forward+backward at B = 2048 ... 16384 queries, N = 2B documents (GritLM's positive +
hard negative), D = 4096 bf16, on the triton backend, against GritLM's eager loss
(F.normalize, matmul, cross_entropy in bf16: the B x N logits, their softmax and gradient
all live in memory). GradCache on a small token-level MLP encoder: peak memory as the batch
grows (should stay flat) and the step's time against the unchunked step.
CPU: the same comparisons at small sizes (cpu backend).

FLOPs counted: 6BND per forward+backward (the logits GEMM and its two gradient GEMMs), not
the recomputation. Peak memory is torch.cuda.max_memory_allocated during one call above
what was allocated before it (inputs excluded), in MiB, in ``Case.extra``.
"""

from __future__ import annotations

import functools
import torch

from grit_kernels import GradCache, contrastive_loss
from grit_kernels.reference import contrastive_loss as ref

from .common import Case, Skipped, sync, with_backend

TEMPERATURE = 0.02


def eager_loss(q, d):
    """GritLM's DistributedContrastiveLoss on normalised reps, in the inputs' dtype."""
    return ref.contrastive_loss(q, d, temperature=TEMPERATURE, dtype=q.dtype)


def _fwd_bwd(loss_fn, q, d):
    def call():
        q.grad = d.grad = None
        loss_fn(q, d).backward()
    return call


def peak_mib(fn, device) -> float | None:
    """Peak memory of one call above what was allocated before it (MiB); None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _memory(ours, baseline, device) -> dict:
    mine, base = peak_mib(ours, device), peak_mib(baseline, device)
    if mine is None:
        return {}
    return dict(peak_mib=round(mine, 1), baseline_peak_mib=round(base, 1), memory_ratio=round(base / max(mine, 1e-9), 2))


def loss_cases(device, dtype, sizes, D, backend):
    out = []
    gen = torch.Generator(device=device).manual_seed(0)
    name = str(dtype).replace("torch.", "")
    for B in sizes:
        N = 2 * B
        q = torch.randn(B, D, device=device, dtype=dtype, generator=gen).requires_grad_()
        d = torch.randn(N, D, device=device, dtype=dtype, generator=gen).requires_grad_()
        ours = with_backend(backend, _fwd_bwd(functools.partial(contrastive_loss, temperature=TEMPERATURE), q, d))
        base = _fwd_bwd(eager_loss, q, d)
        out.append(Case("contrastive_loss fwd+bwd", f"B={B} N={N} D={D} {name}", backend, ours, baseline=base,
                        baseline_name="eager gritlm loss", flops=6 * B * N * D, extra=_memory(ours, base, device)))
        q.grad = d.grad = None
    return out


class TokenEncoder(torch.nn.Module):
    """(B, S, H) token features -> (B, E) mean-pooled reps: activations O(B * S * F)."""

    def __init__(self, H, F, E, dropout=0.1):
        super().__init__()
        self.up, self.down = torch.nn.Linear(H, F), torch.nn.Linear(F, E)
        self.drop = torch.nn.Dropout(dropout)

    def forward(self, x):
        return self.down(self.drop(torch.nn.functional.gelu(self.up(x)))).mean(dim=1)


def grad_cache_cases(device, batches, chunk, S, H, F, E, backend):
    out = []
    torch.manual_seed(0)
    enc = TokenEncoder(H, F, E).to(device)
    loss_fn = functools.partial(contrastive_loss, temperature=TEMPERATURE)
    gc = GradCache(enc, chunk, loss_fn)
    for B in batches:
        xq = torch.randn(B, S, H, device=device)
        xd = torch.randn(2 * B, S, H, device=device)

        def cached(xq=xq, xd=xd):
            enc.zero_grad(set_to_none=True)
            gc.step(xq, xd)

        def plain(xq=xq, xd=xd):
            enc.zero_grad(set_to_none=True)
            loss_fn(enc(xq), enc(xd)).backward()

        out.append(Case("grad_cache step", f"B={B} (+{2 * B} docs) S={S} H={H} F={F} fp32 chunk={chunk}",
                        f"grad_cache/{backend}", with_backend(backend, cached),
                        baseline=with_backend(backend, plain), baseline_name="unchunked step",
                        extra=_memory(with_backend(backend, cached), with_backend(backend, plain), device)))
    return out


def cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        sizes = (2048,) if quick else (2048, 4096, 8192, 16384)
        out = loss_cases(device, torch.bfloat16, sizes, 4096, "triton")
        batches = (256, 1024) if quick else (256, 1024, 4096)
        out += grad_cache_cases(device, batches, chunk=128, S=64, H=512, F=2048, E=512, backend="triton")
        return out
    out = loss_cases(device, torch.float32, (32,) if quick else (64, 256), 256, "cpu")
    out += grad_cache_cases(device, (16,) if quick else (16, 64), chunk=8, S=16, H=32, F=128, E=32, backend="cpu")
    out.append(Skipped("contrastive_loss fwd+bwd", "B=2048..16384 N=2B D=4096 bf16 (triton)", "needs a CUDA device"))
    out.append(Skipped("grad_cache step", "B=256..4096 S=64 H=512 F=2048 (triton loss)", "needs a CUDA device"))
    return out
