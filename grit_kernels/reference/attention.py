"""Attention in plain PyTorch with an explicit boolean mask: the oracle for tests.

Written for clarity, not speed: it materialises the (Sq, Sk) scores of every head.
Conventions are flash-attn's (flash_attn_interface.py); the mask is ``grit_kernels._mask``:

* ``window = (left, right)`` is inclusive, ``-1`` is unbounded on that side.
* When ``Sq != Sk`` the diagonal is bottom-right aligned (``shift = Sk - Sq``): the last query
  sits on the last key. ``causal=True`` is the window's right side set to 0.
* GQA: query head ``h`` attends to key/value head ``h // (Hq // Hkv)``.
* A query row that sees no key at all (``Sq > Sk`` with ``causal``, or a window that falls
  outside the keys) gives a zero output row and ``lse = -inf``; its gradients are zero.
  (flash-attn also writes zeros there; -inf is log of the empty sum.)

``attention_ref`` is the oracle, differentiable by autograd, for all three layouts (padded,
packed, and padded with per-row key counts as in a KV cache). ``forward`` / ``backward``
are the reference backend of the ``attention`` op (``GRIT_BACKEND=reference``): the same
math, with the backward written out as FlashAttention's recomputation so that it can take a
gradient of ``lse`` too.

Shapes: B batch, Sq/Sk query/key lengths, Hq query heads, Hkv key/value heads, Dh head dim,
Tq/Tk packed tokens.
"""

from __future__ import annotations

import math

import torch

from .._mask import visible


def visible_mask(Sq: int, Sk: int, causal: bool, window: tuple[int, int], device=None) -> torch.Tensor:
    """(Sq, Sk) bool, True where query i may attend to key j (``grit_kernels._mask.visible``)."""
    return visible(Sq, Sk, causal, window, device=device)


def _expand_kv(x_BSHD: torch.Tensor, Hq: int) -> torch.Tensor:
    """(B, Sk, Hkv, Dh) -> (B, Sk, Hq, Dh): each KV head serves Hq // Hkv consecutive query heads."""
    return x_BSHD.repeat_interleave(Hq // x_BSHD.shape[2], dim=2)


def _padded(q, k, v, causal, window, scale, upcast: bool, seqlens_k=None):
    """q (B, Sq, Hq, Dh), k/v (B, Sk, Hkv, Dh) -> out (B, Sq, Hq, Dh) in the matmul dtype,
    lse (B, Hq, Sq) in the softmax dtype. ``seqlens_k`` (B,) int64: keys of each row (default Sk)."""
    B, Sq, Hq, Dh = q.shape
    Sk = k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)  # softmax precision (fp64 stays fp64)
    mm = wide if upcast else q.dtype  # matmul precision
    if seqlens_k is not None:  # what lies past a row's keys (garbage, NaN) must not reach 0 * x
        real = (torch.arange(Sk, device=k.device) < seqlens_k.to(k.device)[:, None])[:, :, None, None]
        k, v = k.masked_fill(~real, 0), v.masked_fill(~real, 0)
    q, k, v = q.to(mm), _expand_kv(k.to(mm), Hq), _expand_kv(v.to(mm), Hq)
    if Sk == 0:  # no keys: every row is empty (0 * q keeps the autograd graph connected)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=wide, device=q.device)
        return 0 * q, lse + 0 * q.sum(-1).transpose(1, 2).to(wide)
    s = torch.einsum("bihd,bjhd->bhij", q, k).to(wide) * scale
    lengths = Sk if seqlens_k is None else seqlens_k.to(q.device)[:, None, None]
    mask = visible(Sq, lengths, causal, window, L=Sk, device=q.device)  # (Sq, Sk) or (B, Sq, Sk)
    s = s.masked_fill(~(mask if mask.dim() == 2 else mask[:, None]), float("-inf"))
    # Softmax by hand so that rows with no visible key give 0 (not 0/0) and no NaN gradient.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)  # exp(-inf) = 0 on masked entries
    denom = p.sum(dim=-1, keepdim=True)
    seen = denom > 0
    p = p / torch.where(seen, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bjhd->bihd", p.to(mm), v)  # upcast=False: P rounded first, as flash-attn
    lse = torch.where(seen, m + torch.log(torch.where(seen, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf"))).squeeze(-1)
    return out, lse


def attention_ref(q, k, v, *, causal=False, window=(-1, -1), softmax_scale=None, cu_seqlens_q=None,
                  cu_seqlens_k=None, seqlens_k=None, upcast=True):
    """The oracle: (out in q's dtype, lse fp32, fp64 for fp64 inputs).

    Padded: q (B, Sq, Hq, Dh), k/v (B, Sk, Hkv, Dh) -> out (B, Sq, Hq, Dh), lse (B, Hq, Sq).
            ``seqlens_k`` (B,) (tensor or list): row b sees only its first seqlens_k[b] keys,
            its diagonal aligned to them (a KV cache whose rows hold different lengths).
    Packed: q (Tq, Hq, Dh), k/v (Tk, Hkv, Dh), cu_seqlens_q/k (B + 1,) int32
            -> out (Tq, Hq, Dh), lse (Hq, Tq). Each sequence is attended on its own.

    ``upcast=True``: everything in fp32 (fp64 for fp64 inputs: the high-precision oracle).
    ``upcast=False``: flash-attn's ``attention_ref(upcast=False)``, the low-precision
    reference of the tolerance rule: QKᵀ and PV in the inputs' dtype, softmax in fp32, P
    rounded to the inputs' dtype before PV. Differentiable by autograd.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out_dtype, lse_dtype = q.dtype, torch.promote_types(q.dtype, torch.float32)
    if cu_seqlens_q is None:
        if seqlens_k is not None:
            seqlens_k = torch.as_tensor(seqlens_k, dtype=torch.int64)
        out, lse = _padded(q, k, v, causal, window, scale, upcast, seqlens_k)
        return out.to(out_dtype), lse.to(lse_dtype)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l = _padded(q[None, qs], k[None, ks], v[None, ks], causal, window, scale, upcast)
        outs.append(o[0].to(out_dtype))
        lses.append(l[0].to(lse_dtype))
    Hq, Dh = q.shape[1], q.shape[2]
    out = torch.cat(outs, dim=0) if outs else q.new_zeros((0, Hq, Dh))
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((Hq, 0), dtype=lse_dtype)
    return out, lse


# ---------------------------------------------------------------------------------------
# the op's reference backend (GRIT_BACKEND=reference)
# ---------------------------------------------------------------------------------------


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale):
    """(out in q's dtype, lse fp32). Computes in fp32 (fp64 stays fp64)."""
    with torch.no_grad():
        out, lse = attention_ref(q, k, v, causal=causal, window=window, softmax_scale=scale,
                                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return out.contiguous(), lse.float().contiguous()


def _padded_backward(q, k, v, out, lse, dout, dlse, causal, window, scale):
    """FlashAttention's backward on one padded batch, all fp32/fp64 (B, S, H, Dh) tensors.

    P = exp(S - lse) is recomputed from the saved lse; dS = P * (dP - delta) with
    delta = rowsum(dO * O) - dlse (the lse term: d lse_i / d s_ij = P_ij).
    """
    B, Sq, Hq, Dh = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    ke, ve = _expand_kv(k, Hq), _expand_kv(v, Hq)
    s = torch.einsum("bihd,bjhd->bhij", q, ke) * scale
    mask = visible_mask(Sq, Sk, causal, window, device=q.device)
    # Rows that saw nothing have lse = -inf; +inf there makes their P exactly 0.
    lse = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse)
    p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0)
    delta = (dout * out).sum(dim=-1).transpose(1, 2) - dlse  # (B, Hq, Sq)
    dv = torch.einsum("bhij,bihd->bjhd", p, dout)
    dp = torch.einsum("bihd,bjhd->bhij", dout, ve)
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhij,bjhd->bihd", ds, ke) * scale
    dk = torch.einsum("bhij,bihd->bjhd", ds, q) * scale
    g = Hq // Hkv  # sum each KV head's query group
    dk = dk.reshape(B, Sk, Hkv, g, Dh).sum(dim=3)
    dv = dv.reshape(B, Sk, Hkv, g, Dh).sum(dim=3)
    return dq, dk, dv


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
             window, scale):
    """(dq, dk, dv) in the inputs' dtypes; dlse may be None (lse not used downstream)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    args = [t.to(work) for t in (q, k, v, out, dout)]
    lse = lse.to(work)
    dlse = torch.zeros_like(lse) if dlse is None else dlse.to(work)
    if cu_seqlens_q is None:
        dq, dk, dv = _padded_backward(*args[:4], lse, args[4], dlse, causal, window, scale)
    else:
        qw, kw, vw, ow, dow = args
        dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kw), torch.zeros_like(vw)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cq) - 1):
            qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
            g = _padded_backward(qw[None, qs], kw[None, ks], vw[None, ks], ow[None, qs], lse[None, :, qs],
                                 dow[None, qs], dlse[None, :, qs], causal, window, scale)
            dq[qs], dk[ks], dv[ks] = g[0][0], g[1][0], g[2][0]
    return dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dv.to(v.dtype).contiguous()
