"""Attention forward/backward (Triton FlashAttention-2) vs SDPA (flash, cuDNN) and FlexAttention.

GPU, bf16, every baseline in the same run:
* flash-attn's sweep: D = 128, 16 heads (hidden 2048), batch 16k / S for S = 512..16k,
  causal and bidirectional, fwd, bwd and fwd+bwd (quick: S = 1k and 4k).
* GritLM's heads (Hq = 32, Hkv = 8, D = 128), S = 2k, batch 8 (GQA: SDPA with enable_gqa,
  Flex with enable_gqa; neither repeats K/V).
* A packed batch of mixed lengths (GritLM heads, ~16k tokens): vs FlexAttention with a
  document mask over the same tokens, and SDPA flash over the padded batch (what padding
  costs; FLOPs counted are the packed ones, so its TFLOP/s is useful work only).
Rows: ``triton`` is ours, its ratio against SDPA's flash backend (FA2), the issue's target;
``sdpa-cudnn``, ``flex`` rows give the other baselines' TFLOP/s on the same shapes.
FLOPs follow flash-attn's benchmarks: fwd 4·B·S²·H·D (halved when causal), bwd 2.5x fwd.
CPU: one small case on the cpu backend vs eager SDPA; GPU cases appear as skipped.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from grit_kernels import attention

from .common import Case, Skipped

D = 128


def attn_flops(B, S, H, D, causal, mode, S_k=None):
    """flash-attn's count: 4·B·Sq·Sk·H·D forward (halved when causal); bwd 2.5x; fwd+bwd 3.5x."""
    f = 4 * B * S * (S_k or S) * H * D
    if causal:
        f /= 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def _timed(mode, fwd, inputs):
    """A callable that runs fwd (mode 'fwd'), its backward only ('bwd'), or both ('fwd+bwd')."""
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return fwd()
        return call
    if mode == "fwd+bwd":
        def call():
            out = fwd()
            return torch.autograd.grad(out, inputs, torch.ones_like(out))
        return call
    out = fwd()
    dout = torch.randn_like(out)

    def call():  # backward only: the graph of one forward, replayed
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)
    return call


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run(q, k, v, causal):  # q (B, S, H, D) views -> SDPA's (B, H, S, D)
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
    return run


@functools.lru_cache(maxsize=None)
def _flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Every case is a new static shape / mask of the one flex_attention code object: past
    # dynamo's recompile limit (8) later cases would silently run eager, an unfair baseline.
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def _flex_mask(causal, Sq, Sk, device, doc=None):
    from torch.nn.attention.flex_attention import create_block_mask

    if doc is None and not causal:
        return None

    def mask_mod(b, h, qi, kj):
        ok = qi >= kj if causal else qi == qi
        if doc is not None:
            ok = ok & (doc[qi] == doc[kj])
        return ok
    return create_block_mask(mask_mod, None, None, Sq, Sk, device=device)


def _flex_fn(causal, Sq, Sk, device, doc=None):
    block_mask = _flex_mask(causal, Sq, Sk, device, doc)
    flex = _flex()

    def run(q, k, v, _causal):
        return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                    enable_gqa=k.shape[2] != q.shape[2])
    return run


def _probe(fn):
    """None if fn runs (and compiles) here, else the reason (a baseline this build lacks)."""
    try:
        fn()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # e.g. cuDNN attention absent, Flex unsupported on this card
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def _dense_cases(B, S, Hq, Hkv, causal, modes, label, device, gen):
    dtype = torch.bfloat16
    q = torch.randn(B, S, Hq, D, dtype=dtype, device=device, generator=gen).requires_grad_()
    k = torch.randn(B, S, Hkv, D, dtype=dtype, device=device, generator=gen).requires_grad_()
    v = torch.randn(B, S, Hkv, D, dtype=dtype, device=device, generator=gen).requires_grad_()
    ins = (q, k, v)
    shape = f"{label} B={B} S={S} Hq={Hq} Hkv={Hkv} D={D} {'causal' if causal else 'bidir'} bf16"
    impls = {
        "triton": lambda q, k, v, c: attention(q, k, v, causal=c),
        "sdpa-flash": _sdpa("flash"),
        "sdpa-cudnn": _sdpa("cudnn"),
        "flex": _flex_fn(causal, S, S, device),
    }
    out = []
    for mode in modes:
        flops = attn_flops(B, S, Hq, D, causal, mode)
        calls, reasons = {}, {}
        for name, impl in impls.items():
            fwd = functools.partial(impl, q, k, v, causal)
            reason = _probe(lambda: _timed(mode, fwd, ins)())
            if reason is None:
                calls[name] = _timed(mode, fwd, ins)
            else:
                reasons[name] = reason
        op = f"attention {mode}"
        for name, reason in reasons.items():
            out.append(Skipped(op, shape, f"{name}: {reason}"))
        if "triton" in calls:
            base = "sdpa-flash" if "sdpa-flash" in calls else None
            out.append(Case(op, shape, "triton", calls["triton"], baseline=calls.get(base),
                            baseline_name="SDPA flash (FA2)" if base else "", flops=flops))
        for name in ("sdpa-cudnn", "flex"):
            if name in calls:
                out.append(Case(op, shape, name, calls[name], flops=flops))
    return out


def _packed_cases(total, causal, modes, device, gen):
    Hq, Hkv, dtype = 32, 8, torch.bfloat16
    lens = []
    while sum(lens) < total:
        lens.append(int(torch.randint(64, 4097, (1,), generator=torch.Generator().manual_seed(len(lens)))))
    lens[-1] -= sum(lens) - total
    lens = [n for n in lens if n > 0]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T, B, Smax = total, len(lens), max(lens)

    def r(H):
        return torch.randn(T, H, D, dtype=dtype, device=device, generator=gen).requires_grad_()

    q, k, v = r(Hq), r(Hkv), r(Hkv)
    doc = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(lens, device=device))
    # Flex sees the packed tokens as one sequence with a document mask (B = 1).
    flex = _flex_fn(causal, T, T, device, doc=doc)
    # SDPA has no varlen path: GritLM pads to the longest sequence.
    qp, kp, vp = (torch.zeros(B, Smax, t.shape[1], D, dtype=dtype, device=device) for t in (q, k, v))
    for b, n in enumerate(lens):
        qp[b, :n], kp[b, :n], vp[b, :n] = q[cu[b]:cu[b] + n], k[cu[b]:cu[b] + n], v[cu[b]:cu[b] + n]
    qp, kp, vp = (t.requires_grad_() for t in (qp, kp, vp))
    shape = f"packed B={B} T={T} max={Smax} Hq={Hq} Hkv={Hkv} D={D} {'causal' if causal else 'bidir'} bf16"
    out = []
    for mode in modes:
        flops = sum(attn_flops(1, n, Hq, D, causal, mode) for n in lens)
        ours = functools.partial(attention, q, k, v, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                 max_seqlen_q=Smax, max_seqlen_k=Smax)
        flex_fwd = lambda: flex(q[None], k[None], v[None], causal)[0]  # noqa: E731
        sdpa_fwd = functools.partial(_sdpa("flash"), qp, kp, vp, causal)
        op = f"attention {mode}"
        reasons = {n: _probe(lambda f=f, i=i: _timed(mode, f, i)()) for n, f, i in
                   (("flex", flex_fwd, (q, k, v)), ("sdpa-flash padded", sdpa_fwd, (qp, kp, vp)))}
        base = _timed(mode, flex_fwd, (q, k, v)) if reasons["flex"] is None else None
        out.append(Case(op, shape, "triton", _timed(mode, ours, (q, k, v)), baseline=base,
                        baseline_name="FlexAttention (document mask)" if base else "", flops=flops))
        if reasons["sdpa-flash padded"] is None:
            out.append(Case(op, shape, "sdpa-flash padded", _timed(mode, sdpa_fwd, (qp, kp, vp)), flops=flops))
        for name, reason in reasons.items():
            if reason is not None:
                out.append(Skipped(op, shape, f"{name}: {reason}"))
    return out


def _cpu_cases(device, quick):
    B, S, H, Dh = (1, 128, 4, 64) if quick else (2, 256, 8, 64)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, Dh, device=device, generator=gen).requires_grad_() for _ in range(3))
    out = []
    for causal in (False, True):
        shape = f"B={B} S={S} H={H} D={Dh} {'causal' if causal else 'bidir'} fp32"
        for mode in ("fwd", "fwd+bwd"):
            ours = functools.partial(attention, q, k, v, causal=causal)
            eager = lambda c=causal: F.scaled_dot_product_attention(  # noqa: E731
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=c).transpose(1, 2)
            out.append(Case(f"attention {mode}", shape, "cpu", _timed(mode, ours, (q, k, v)),
                            baseline=_timed(mode, eager, (q, k, v)), baseline_name="SDPA (CPU)",
                            flops=attn_flops(B, S, H, Dh, causal, mode)))
    why = "needs a CUDA device"
    sweep = "1k, 4k" if quick else "512..16k"
    out += [
        Skipped("attention fwd/bwd/fwd+bwd", f"sweep S={sweep} B=16k/S H=16 D=128 causal+bidir bf16 "
                "(triton, sdpa-flash, sdpa-cudnn, flex)", why),
        Skipped("attention fwd/bwd/fwd+bwd", "GritLM B=8 S=2048 Hq=32 Hkv=8 D=128 bf16", why),
        Skipped("attention fwd/bwd/fwd+bwd", "packed mixed lengths T=16k Hq=32 Hkv=8 D=128 bf16", why),
    ]
    return out


def cases(device: torch.device, quick: bool):
    if device.type != "cuda":
        return _cpu_cases(device, quick)
    gen = torch.Generator(device=device).manual_seed(0)
    out = []
    seqlens = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    modes = ("fwd", "bwd", "fwd+bwd")
    for S in seqlens:
        for causal in (False, True):
            out += _dense_cases(16384 // S, S, 16, 16, causal, modes, "sweep", device, gen)
    for causal in (False, True):
        out += _dense_cases(8 if not quick else 4, 2048, 32, 8, causal, modes, "GritLM", device, gen)
        out += _packed_cases(8192 if quick else 16384, causal, ("fwd", "fwd+bwd"), device, gen)
    return out
