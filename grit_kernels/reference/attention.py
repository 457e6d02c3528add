"""Attention in plain PyTorch with an explicit boolean mask: the oracle for tests and the CPU path.

Written for clarity, not speed: it materialises the (Sq, Sk) scores of every head.
Conventions are flash-attn's (flash_attn_interface.py), spelled out in ``visible_mask``:

* ``window = (left, right)`` is inclusive, ``-1`` is unbounded on that side.
* When ``Sq != Sk`` the diagonal is bottom-right aligned (``shift = Sk - Sq``): the last query
  sits on the last key. ``causal=True`` is the window's right side set to 0.
* GQA: query head ``h`` attends to key/value head ``h // (Hq // Hkv)``.
* A query row that sees no key at all (``Sq > Sk`` with ``causal``, or a window that falls
  outside the keys) gives a zero output row and ``lse = -inf``; its gradients are zero.
  (flash-attn also writes zeros there; -inf is log of the empty sum.)

``attention_ref`` is differentiable by autograd (the test oracle). ``attention_forward`` and
``attention_backward`` are the op's torch backend: the same math, with the backward written
out as FlashAttention's recomputation so that it can take a gradient of ``lse`` too.
"""

from __future__ import annotations

import math

import torch


def visible_mask(Sq: int, Sk: int, causal: bool, window: tuple[int, int], device=None) -> torch.Tensor:
    """(Sq, Sk) bool, True where query i may attend to key j.

    With ``shift = Sk - Sq``, query i sees key j iff ``0 <= j < Sk`` and::

        j <= i + shift + right      (right = 0 when causal; no bound when right == -1)
        j >= i + shift - left       (no bound when left == -1)

    causal, Sq=3, Sk=5 (shift 2)     window (1, 0), Sq=Sk=4      causal, Sq=5, Sk=3 (shift -2)
        1 1 1 0 0                        1 0 0 0                     0 0 0   <- sees nothing
        1 1 1 1 0                        1 1 0 0                     0 0 0   <- sees nothing
        1 1 1 1 1                        0 1 1 0                     1 0 0
                                         0 0 1 1                     1 1 0
                                                                     1 1 1
    """
    left, right = window
    if causal:
        right = 0
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(Sk, device=device)[None, :]
    shift = Sk - Sq
    mask = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    if right >= 0:
        mask &= j <= i + shift + right
    if left >= 0:
        mask &= j >= i + shift - left
    return mask


def _expand_kv(x_BSHD: torch.Tensor, Hq: int) -> torch.Tensor:
    """(B, Sk, Hkv, D) -> (B, Sk, Hq, D): each KV head serves Hq // Hkv consecutive query heads."""
    return x_BSHD.repeat_interleave(Hq // x_BSHD.shape[2], dim=2)


def _padded(q, k, v, causal, window, scale, dtype):
    """q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq), both ``dtype``."""
    B, Sq, Hq, D = q.shape
    Sk = k.shape[1]
    q, k, v = q.to(dtype), _expand_kv(k.to(dtype), Hq), _expand_kv(v.to(dtype), Hq)
    if Sk == 0:  # no keys: every row is empty (0 * q keeps the autograd graph connected)
        lse = torch.full((B, Hq, Sq), float("-inf"), dtype=dtype, device=q.device)
        return 0 * q, lse + 0 * q.sum(-1).transpose(1, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    mask = visible_mask(Sq, Sk, causal, window, device=q.device)
    s = s.masked_fill(~mask, float("-inf"))
    # Softmax by hand so that rows with no visible key give 0 (not 0/0) and no NaN gradient.
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    p = torch.exp(s - m)  # exp(-inf) = 0 on masked entries
    denom = p.sum(dim=-1, keepdim=True)
    seen = denom > 0
    p = p / torch.where(seen, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    lse = torch.where(seen, m + torch.log(torch.where(seen, denom, torch.ones_like(denom))),
                      torch.full_like(denom, float("-inf"))).squeeze(-1)
    return out, lse


def attention_ref(q, k, v, *, causal=False, window=(-1, -1), softmax_scale=None, cu_seqlens_q=None,
                  cu_seqlens_k=None, dtype=None):
    """The oracle: (out, lse) with out in ``dtype`` (default q's) and lse in ``dtype`` or fp32.

    Padded: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D), lse (B, Hq, Sq).
    Packed: q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens_q/k (B + 1,) int32
            -> out (Tq, Hq, D), lse (Hq, Tq). Each sequence is attended on its own.
    Pass ``dtype=torch.float64`` for the high-precision oracle. Differentiable by autograd.
    """
    dtype = dtype or q.dtype
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_q is None:
        return _padded(q, k, v, causal, window, scale, dtype)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs, ks = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        o, l = _padded(q[None, qs], k[None, ks], v[None, ks], causal, window, scale, dtype)
        outs.append(o[0])
        lses.append(l[0])
    Hq, D = q.shape[1], q.shape[2]
    out = torch.cat(outs, dim=0) if outs else q.new_zeros((0, Hq, D), dtype=dtype)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((Hq, 0), dtype=dtype)
    return out, lse


# ---------------------------------------------------------------------------------------
# the op's torch backend
# ---------------------------------------------------------------------------------------


def attention_forward(q, k, v, causal, window, scale, cu_seqlens_q, cu_seqlens_k):
    """(out in q's dtype, lse fp32). Computes in fp32 (fp64 stays fp64)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        out, lse = attention_ref(q, k, v, causal=causal, window=window, softmax_scale=scale,
                                 cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, dtype=work)
    return out.to(q.dtype), lse.float()


def _padded_backward(q, k, v, out, lse, dout, dlse, causal, window, scale):
    """FlashAttention's backward on one padded batch, all fp32/fp64 (B, S, H, D) tensors.

    P = exp(S - lse) is recomputed from the saved lse; dS = P * (dP - delta) with
    delta = rowsum(dO * O) - dlse (the lse term: d lse_i / d s_ij = P_ij).
    """
    B, Sq, Hq, D = q.shape
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
    dk = dk.reshape(B, Sk, Hkv, g, D).sum(dim=3)
    dv = dv.reshape(B, Sk, Hkv, g, D).sum(dim=3)
    return dq, dk, dv


def attention_backward(dout, dlse, q, k, v, out, lse, causal, window, scale, cu_seqlens_q, cu_seqlens_k):
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
