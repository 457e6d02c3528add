"""Decode attention over a KV cache (append one token + attend) vs SDPA over the cache slice.

GPU: GritLM's heads (Hq=32, Hkv=8, D=128) in bf16, one new token per row, batch 1..64,
cache 1k..32k tokens, every row at the same length so that the baseline,
``F.scaled_dot_product_attention(..., enable_gqa=True)`` over ``cache[:, :len]`` after a slice
assignment of the new k/v, is an honest equivalent.
Two rows per shape: ``triton`` is the public op (Python validation and dispatch included;
its host read of cache_seqlens happens on the first call only, since the lengths tensor is
not modified between calls, as between the layers of one decode step), ``triton kernels``
the append + attention launchers alone. SDPA picks its own backend for GQA decode.
CPU: a small shape on the torch (reference) backend.
Bytes counted: the K and V rows attended (cache_seqlens + 1 per row), read once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from grit_kernels import attention_with_kvcache

from .common import Case, Skipped, with_backend

HQ, HKV, D = 32, 8, 128


def _inputs(B, length, S_max, dtype, device, gen):
    def r(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, generator=gen)

    q, k, v = r(B, 1, HQ, D), r(B, 1, HKV, D), r(B, 1, HKV, D)
    kc, vc = r(B, S_max, HKV, D), r(B, S_max, HKV, D)
    seqlens = torch.full((B,), length - 1, dtype=torch.int32, device=device)
    return q, k, v, kc, vc, seqlens


def _sdpa_decode(q, k, v, kc, vc, length):
    """Baseline: slice-assign the new token, then SDPA over the first `length` positions."""
    def call():
        kc[:, length - 1:length] = k
        vc[:, length - 1:length] = v
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), kc[:, :length].transpose(1, 2), vc[:, :length].transpose(1, 2), enable_gqa=True,
        ).transpose(1, 2)
    return call


def _kernels_only(q, k, v, kc, vc, seqlens):
    from grit_kernels.triton import attention_kvcache as tri

    scale = D ** -0.5

    def call():
        tri.append_kv(kc, vc, seqlens, k, v)
        return tri.attention(q, kc, vc, seqlens, 1, causal=True, window=(-1, -1), softmax_scale=scale)
    return call


def cases(device: torch.device, quick: bool):
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    if device.type == "cuda":
        batches = (1, 16) if quick else (1, 4, 16, 64)
        lengths = (1024, 8192) if quick else (1024, 4096, 16384, 32768)
        for B in batches:
            for length in lengths:
                if B * length > 64 * 32768:
                    continue
                q, k, v, kc, vc, seqlens = _inputs(B, length, length, torch.bfloat16, device, gen)
                nbytes = 2 * B * length * HKV * D * kc.element_size()
                shape = f"B={B} cache={length} Hq={HQ} Hkv={HKV} D={D} bf16"
                base = _sdpa_decode(q, k, v, kc, vc, length)
                out.append(Case("kvcache decode", shape, "triton",
                                with_backend("triton", lambda q=q, k=k, v=v, kc=kc, vc=vc, s=seqlens:
                                             attention_with_kvcache(q, kc, vc, s, k, v)),
                                baseline=base, baseline_name="sdpa(enable_gqa)", bytes=nbytes))
                out.append(Case("kvcache decode", shape, "triton kernels", _kernels_only(q, k, v, kc, vc, seqlens),
                                baseline=base, baseline_name="sdpa(enable_gqa)", bytes=nbytes))
    else:
        B, length = (2, 256) if quick else (4, 1024)
        q, k, v, kc, vc, seqlens = _inputs(B, length, length, torch.float32, device, gen)
        nbytes = 2 * B * length * HKV * D * kc.element_size()
        shape = f"B={B} cache={length} Hq={HQ} Hkv={HKV} D={D} fp32"
        out.append(Case("kvcache decode", shape, "cpu",
                        with_backend("cpu", lambda: attention_with_kvcache(q, kc, vc, seqlens, k, v)),
                        baseline=_sdpa_decode(q, k, v, kc, vc, length), baseline_name="sdpa(enable_gqa)",
                        bytes=nbytes))
        out.append(Skipped("kvcache decode", "B=1..64 cache=1k..32k Hq=32 Hkv=8 D=128 bf16 (triton)",
                           "needs a CUDA device"))
    return out
