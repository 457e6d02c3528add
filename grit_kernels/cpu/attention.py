"""Attention on CPU tensors: the cpu backend of ``attention`` (PyTorch's fused CPU kernel).

    forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window, scale)
        -> out (q's shape), lse (B, Hq, Sq) or (Hq, Tq) fp32
    backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             causal, window, scale) -> dq, dk, dv

Built on PyTorch's fused CPU flash-attention kernel, the one ``F.scaled_dot_product_attention``
dispatches to on CPU, called through its aten op so that it also returns the logsumexp (lse
costs nothing extra, and the op's backward reuses the saved out and lse without a
recomputed forward):

    _FLASH(q_BHSD, k_BHkvSD, v_BHkvSD, dropout, is_causal, attn_mask, scale)
        -> out (B, Hq, Sq, Dh), lse (B, Hq, Sq)

It takes GQA directly (fewer K/V heads, summed back in the backward), any strides with a
dense last dim (so (B, S, H, Dh) tensors go in as transposed views, and its output comes back
laid out as (B, S, H, Dh)), and computes the softmax in fp32 for fp16/bf16 inputs. Measured on
this project's CPU runner (one thread, B=1, S=1000, Hq=4, Hkv=2, Dh=32, fp32): 7.5 ms
bidirectional, 5.7 ms causal, vs 39 / 47 ms for the reference.

What the kernel does not do, and how it is handled here:

* Its ``is_causal`` is top-left aligned; flash-attn's diagonal is bottom-right aligned.
  ``_plan`` reduces every (Sq, Sk, window) to: rows that see no key (skipped, zero output,
  lse -inf), then no mask, ``is_causal`` (when the remaining problem is square), causal with
  Sq < Sk as two calls merged by their lse (forward; the backward takes the mask), or an
  explicit additive mask.
* A fully masked row gives out 0 but lse 0, and empty sequences (Sq = 0 or Sk = 0) crash the
  process (SIGFPE): neither ever reaches it. The only rows that can see nothing are a
  leading run (``_plan``), so they are sliced off rather than masked.
* Its backward has no lse gradient. A nonzero one goes through the same kernel with the
  head dim widened by one column (``_backward_rows``): q, k and out get a 0, v a 1 and dout
  the lse gradient, so dP gains dlse_i in every column while delta = rowsum(dO * O) stays.
  That is dS = P (dP - delta + dlse), the lse term exactly.

Shapes: B batch, S sequence, Hq query heads, Hkv key/value heads, Dh head dim, T packed tokens.
"""

from __future__ import annotations

import torch

from .._mask import visible

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
            window: tuple[int, int], scale: float):
    """-> (out contiguous in q's dtype, lse fp32): padded (B, Sq, Hq, Dh) / (B, Hq, Sq), or
    packed (Tq, Hq, Dh) / (Hq, Tq). max_seqlen_* are unused (the host reads cu_seqlens)."""
    if cu_seqlens_q is None:
        out, lse = _forward_padded(q, k, v, causal, window, scale)
    else:
        out, lse = _forward_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, scale)
    return out.contiguous(), lse.float().contiguous()


def backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
             causal: bool, window: tuple[int, int], scale: float):
    """-> (dq, dk, dv) contiguous, shaped like q, k, v. ``dlse`` (lse's shape) or None."""
    # Autograd hands an unused lse zeros, not None: skip the widened head dim then.
    if dlse is not None and not bool(dlse.any()):
        dlse = None
    if cu_seqlens_q is None:
        grads = _backward_padded(dout, dlse, q, k, v, out, lse, causal, window, scale)
    else:
        grads = _backward_packed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, window,
                                 scale)
    return tuple(g.contiguous() for g in grads)


# ---------------------------------------------------------------------------------------
# the mask, reduced to what the kernel can take
# ---------------------------------------------------------------------------------------


def _plan(Sq: int, Sk: int, causal: bool, left: int, right: int) -> tuple[int, int, int]:
    """(skip, left, right): query rows [0, skip) see no key; for rows [skip, Sq) the window
    sides are -1 where they never bind.

    With shift = Sk - Sq, row i sees keys [max(0, i + shift - left), min(Sk - 1, i + shift + right)].
    That range is empty only when its top is below 0 (left, right >= 0 keep it ordered, and
    its bottom never passes Sk - 1), i.e. for i < Sq - Sk - right: a leading run of rows.
    On the rest (Sq' = Sq - skip rows) the left side binds somewhere iff left < Sk - 1 (the
    last row's bottom is Sk - 1 - left) and the right side iff right < Sq' - 1 (the first
    row's top is Sk - Sq' + right).
    """
    if causal:
        right = 0
    if Sk == 0:
        return Sq, -1, -1
    skip = min(Sq, max(0, Sq - Sk - right)) if right >= 0 else 0
    Sq -= skip
    if left >= Sk - 1:
        left = -1
    if right >= Sq - 1:
        right = -1
    return skip, left, right


def _additive(seen: torch.Tensor, dtype) -> torch.Tensor:
    """The kernel's mask: 0 where visible, -inf elsewhere, in the inputs' dtype (it takes no bool)."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def _mask_args(Sq: int, Sk: int, left: int, right: int, dtype, device) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, attn_mask) for a problem that ``_plan`` reduced (every row sees a key)."""
    if left < 0 and right < 0:
        return False, None
    if left < 0 and right == 0 and Sq == Sk:  # square: top-left == bottom-right
        return True, None
    return False, _additive(visible(Sq, Sk, False, (left, right), device=device), dtype)


# ---------------------------------------------------------------------------------------
# padded layout
# ---------------------------------------------------------------------------------------


def _lse_dtype(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward_padded(q, k, v, causal: bool, window: tuple[int, int], scale: float):
    """q (B, Sq, Hq, Dh), k/v (B, Sk, Hkv, Dh), any strides with a dense Dh
    -> out (B, Sq, Hq, Dh) contiguous in q's dtype, lse (B, Hq, Sq) fp32 (fp64 for fp64)."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    skip, left, right = _plan(Sq, Sk, causal, *window)
    if skip == 0 and q.numel() > 0:
        return _forward_rows(q, k, v, left, right, scale)
    out = q.new_zeros(B, Sq, H, D)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    if skip < Sq and q.numel() > 0:
        out[:, skip:], lse[..., skip:] = _forward_rows(q[:, skip:], k, v, left, right, scale)
    return out, lse


# Causal with Sq < Sk from this many query rows on: two mask-free calls merged by their lse
# beat one call with an explicit mask (B=1, H=4/2, D=32, one thread: Sq=Sk-30=1000: 7.2 vs
# 10.8 ms; Sq=256: 0.75 vs 0.86 ms; Sq=16: 0.069 vs 0.061 ms).
_MERGE_MIN_ROWS = 64
_DENSE_KV_MIN_ROWS = 128


def _forward_rows(q, k, v, left, right, scale):
    """Kernel calls on rows that all see a key (window already reduced by ``_plan``)."""
    Sq, Sk = q.shape[1], k.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, S, H, D) <-> the kernel's (B, H, S, D)
    # The kernel walks each head's keys and values in blocks, once per block of queries:
    # copied to (B, Hkv, Sk, Dh) they are dense, instead of strided by the model's packed q/k/v
    # rows or the cache's. That pays once there are a few query blocks (one thread, fp32, the
    # copy included; Hq/Hkv/Dh = 32/8/128: Sq=Sk=512 43.2 -> 35.5 ms, Sq=Sk=1000 139.3 ->
    # 126.1 ms bidirectional, Sq=256 over Sk=4000 175.7 -> 156.7 ms causal; 8/4/32: Sq=128
    # over Sk=4000 7.1 -> 6.2 ms, Sq=Sk=1000 within 1 %); 16 rows over 4000 keys spend more on
    # the copy than the kernel spends reading (21.2 -> 34.3 ms).
    kt, vt = t(k), t(v)
    if Sq >= _DENSE_KV_MIN_ROWS:
        kt, vt = kt.contiguous(), vt.contiguous()
    if left < 0 and right == 0 and Sk > Sq >= _MERGE_MIN_ROWS:
        # Bottom-right causal = keys [0, Sk - Sq) seen by every row + a square top-left causal
        # block on the last Sq keys; the two softmaxes are merged with their lse (in fp32).
        shift = Sk - Sq
        o1, l1 = _FLASH(t(q), kt[:, :, :shift], vt[:, :, :shift], 0.0, False, scale=scale)
        o2, l2 = _FLASH(t(q), kt[:, :, shift:], vt[:, :, shift:], 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        wide = torch.promote_types(q.dtype, torch.float32)
        w1, w2 = (t(torch.exp(x - lse))[..., None] for x in (l1, l2))  # (B, Sq, H, 1)
        return (t(o1).to(wide) * w1 + t(o2).to(wide) * w2).to(q.dtype), lse
    is_causal, mask = _mask_args(Sq, Sk, left, right, q.dtype, q.device)
    out, lse = _FLASH(t(q), kt, vt, 0.0, is_causal, attn_mask=mask, scale=scale)
    return t(out), lse  # the kernel lays out its output as (B, S, H, D): t(out) is contiguous


def _backward_padded(dout, dlse, q, k, v, out, lse, causal: bool, window: tuple[int, int], scale: float):
    """(dq, dk, dv) shaped like q, k, v (dout, out like q; lse, dlse (B, Hq, Sq), dlse may be
    None): FlashAttention's backward from the saved out and lse."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    skip, left, right = _plan(Sq, Sk, causal, *window)
    if skip == 0 and q.numel() > 0:
        return _backward_rows(dout, dlse, q, k, v, out, lse, left, right, scale)
    # Rows that saw nothing have no gradient; with no row left, k and v have none either.
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if skip < Sq and q.numel() > 0:
        dq[:, skip:], dk[:], dv[:] = _backward_rows(dout[:, skip:], None if dlse is None else dlse[..., skip:],
                                                    q[:, skip:], k, v, out[:, skip:], lse[..., skip:], left,
                                                    right, scale)
    return dq, dk, dv


def _backward_rows(dout, dlse, q, k, v, out, lse, left, right, scale):
    is_causal, mask = _mask_args(q.shape[1], k.shape[1], left, right, q.dtype, q.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    Dh = q.shape[-1]
    if dlse is not None:  # the lse gradient as one more head-dim column (module docstring)
        def widen(x, col):
            return torch.cat([x, col.to(x.dtype).expand(*x.shape[:-1], 1)], dim=-1)
        zero, one = q.new_zeros(()), q.new_ones(())
        q, k, out = widen(q, zero), widen(k, zero), widen(out, zero)
        v = widen(v, one)
        dout = torch.cat([dout, t(dlse)[..., None].to(dout.dtype)], dim=-1)
    grads = _FLASH_BWD(t(dout), t(q), t(k), t(v), t(out), lse.to(_lse_dtype(q.dtype)), 0.0, is_causal,
                       attn_mask=mask, scale=scale)
    return tuple(t(g)[..., :Dh] for g in grads)


# ---------------------------------------------------------------------------------------
# packed layout: one kernel call per run of consecutive sequences of equal lengths
# ---------------------------------------------------------------------------------------


def _runs(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
    """(q start, k start, n sequences, Sq, Sk) for each run of consecutive sequences whose
    (Sq, Sk) agree: such a run is a (n, Sq, H, D) view of the packed tokens, one kernel call.
    Reads cu_seqlens on the host (these are CPU tensors: no device sync)."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    runs = []
    for b in range(len(cq) - 1):
        sq, sk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        if sq == 0:
            continue  # no query, nothing to compute (its keys get zero gradients)
        last = runs[-1] if runs else None
        if last and (last[3], last[4]) == (sq, sk) and last[0] + last[2] * sq == cq[b] \
                and last[1] + last[2] * sk == ck[b]:
            last[2] += 1
        else:
            runs.append([cq[b], ck[b], 1, sq, sk])
    return runs


def _run_views(run, *tensors_and_lengths):
    """(n, S, H, D) views of the packed (T, H, D) tensors for one run."""
    q0, k0, n, sq, sk = run
    views = []
    for t, which in tensors_and_lengths:
        start, length = (q0, sq) if which == "q" else (k0, sk)
        views.append(t[start:start + n * length].unflatten(0, (n, length)))
    return views


def _forward_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, scale):
    """q (Tq, Hq, Dh), k/v (Tk, Hkv, Dh) -> out (Tq, Hq, Dh), lse (Hq, Tq) fp32 (fp64 for fp64)."""
    runs = _runs(cu_seqlens_q, cu_seqlens_k)
    Tq, H, D = q.shape
    if len(runs) == 1 and runs[0][2] * runs[0][3] == Tq:  # one run covers every query: no copy
        qr, kr, vr = _run_views(runs[0], (q, "q"), (k, "k"), (v, "k"))
        o, l = _forward_padded(qr, kr, vr, causal, window, scale)
        return o.reshape(Tq, H, D), l.transpose(0, 1).reshape(H, Tq)
    out = q.new_zeros(Tq, H, D)  # sequences without keys stay zero
    lse = torch.full((H, Tq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for run in runs:
        q0, _, n, sq, _ = run
        qr, kr, vr = _run_views(run, (q, "q"), (k, "k"), (v, "k"))
        o, l = _forward_padded(qr, kr, vr, causal, window, scale)
        out[q0:q0 + n * sq] = o.flatten(0, 1)
        lse[:, q0:q0 + n * sq] = l.transpose(0, 1).flatten(1)
    return out, lse


def _backward_packed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, window, scale):
    """(dq, dk, dv) shaped like the packed q, k, v."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for run in _runs(cu_seqlens_q, cu_seqlens_k):
        q0, k0, n, sq, sk = run
        dor, qr, kr, vr, outr = _run_views(run, (dout, "q"), (q, "q"), (k, "k"), (v, "k"), (out, "q"))
        rows = lambda x: x[:, q0:q0 + n * sq].unflatten(1, (n, sq)).transpose(0, 1)  # noqa: E731 (n, Hq, Sq)
        g = _backward_padded(dor, None if dlse is None else rows(dlse), qr, kr, vr, outr, rows(lse), causal,
                             window, scale)
        dq[q0:q0 + n * sq] = g[0].flatten(0, 1)
        dk[k0:k0 + n * sk] = g[1].flatten(0, 1)
        dv[k0:k0 + n * sk] = g[2].flatten(0, 1)
    return dq, dk, dv
