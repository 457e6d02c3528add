"""Fast plain-PyTorch attention for CPU tensors: the torch backend of ``attention`` and
``attention_with_kvcache`` (grit_kernels/reference stays the independent oracle for tests).

Built on PyTorch's fused CPU flash-attention kernel, the one ``F.scaled_dot_product_attention``
dispatches to on CPU, called through its aten op so that it also returns the logsumexp (lse
costs nothing extra, and the op's backward reuses the saved out and lse without a
recomputed forward):

    _flash(q_BHSD, k_BKSD, v_BKSD, is_causal, attn_mask, scale) -> out (B, H, Sq, D), lse (B, H, Sq)

It takes GQA directly (fewer K/V heads, summed back in the backward), any strides with a
dense last dim (so (B, S, H, D) tensors go in as transposed views, and its output comes back
laid out as (B, S, H, D)), and computes the softmax in fp32 for fp16/bf16 inputs. Measured on
this project's CPU runner (one thread, B=1, S=1000, Hq=4, Hkv=2, D=32, fp32): 7.5 ms
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
* Its backward has no lse gradient: a call whose lse gradient is nonzero is handed back to
  the reference (``backward`` returns None).
* It reads every key it is given: rows of a KV cache with different lengths would load the
  garbage past a row's length (NaN * 0 = NaN), so ``kvcache_forward`` zeroes it in a copy.

Shapes: B batch, S sequence, H query heads, K key/value heads, D head dim, T packed tokens.
"""

from __future__ import annotations

import torch

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the fast path runs these tensors: CPU, a float dtype, and a torch that has the kernel.

    Anything else (e.g. CUDA tensors with GRIT_BACKEND=torch forced) runs the reference.
    """
    return _FLASH is not None and all(
        t is None or (t.device.type == "cpu" and t.dtype in _DTYPES) for t in tensors
    )


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


def _visible(Sq: int, Sk, L: int, left: int, right: int, device) -> torch.Tensor:
    """(..., Sq, L) bool, True where query i sees key j: j < Sk and, with shift = Sk - Sq,
    i + shift - left <= j <= i + shift + right (a side -1 = unbounded).

    ``Sk`` is an int or a (B, 1, 1) int64 tensor of per-row key counts (then L >= max Sk).
    """
    i = torch.arange(Sq, device=device)[:, None]
    j = torch.arange(L, device=device)
    diag = i + (Sk - Sq)
    visible = j < Sk if isinstance(Sk, torch.Tensor) else torch.ones(Sq, L, dtype=torch.bool, device=device)
    if right >= 0:
        visible = visible & (j <= diag + right)
    if left >= 0:
        visible = visible & (j >= diag - left)
    return visible


def _additive(visible: torch.Tensor, dtype) -> torch.Tensor:
    """The kernel's mask: 0 where visible, -inf elsewhere, in the inputs' dtype (it takes no bool)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def _mask_args(Sq: int, Sk: int, left: int, right: int, dtype, device) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, attn_mask) for a problem that ``_plan`` reduced (every row sees a key)."""
    if left < 0 and right < 0:
        return False, None
    if left < 0 and right == 0 and Sq == Sk:  # square: top-left == bottom-right
        return True, None
    return False, _additive(_visible(Sq, Sk, Sk, left, right, device), dtype)


# ---------------------------------------------------------------------------------------
# padded layout
# ---------------------------------------------------------------------------------------


def _lse_dtype(dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(q, k, v, causal: bool, window: tuple[int, int], scale: float):
    """q (B, Sq, H, D), k/v (B, Sk, K, D), any strides with a dense D
    -> out (B, Sq, H, D) contiguous in q's dtype, lse (B, H, Sq) fp32 (fp64 for fp64)."""
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


def _forward_rows(q, k, v, left, right, scale):
    """Kernel calls on rows that all see a key (window already reduced by ``_plan``)."""
    Sq, Sk = q.shape[1], k.shape[1]
    t = lambda x: x.transpose(1, 2)  # noqa: E731  (B, S, H, D) <-> the kernel's (B, H, S, D)
    if left < 0 and right == 0 and Sk > Sq >= _MERGE_MIN_ROWS:
        # Bottom-right causal = keys [0, Sk - Sq) seen by every row + a square top-left causal
        # block on the last Sq keys; the two softmaxes are merged with their lse (in fp32).
        shift = Sk - Sq
        o1, l1 = _FLASH(t(q), t(k[:, :shift]), t(v[:, :shift]), 0.0, False, scale=scale)
        o2, l2 = _FLASH(t(q), t(k[:, shift:]), t(v[:, shift:]), 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        wide = torch.promote_types(q.dtype, torch.float32)
        w1, w2 = (t(torch.exp(x - lse))[..., None] for x in (l1, l2))  # (B, Sq, H, 1)
        return (t(o1).to(wide) * w1 + t(o2).to(wide) * w2).to(q.dtype), lse
    is_causal, mask = _mask_args(Sq, Sk, left, right, q.dtype, q.device)
    out, lse = _FLASH(t(q), t(k), t(v), 0.0, is_causal, attn_mask=mask, scale=scale)
    return t(out), lse  # the kernel lays out its output as (B, S, H, D): t(out) is contiguous


def backward(dout, q, k, v, out, lse, causal: bool, window: tuple[int, int], scale: float):
    """(dq, dk, dv) shaped like q, k, v (dout, out like q; lse (B, H, Sq)): FlashAttention's
    backward from the saved out and lse, for a loss of ``out`` only."""
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    skip, left, right = _plan(Sq, Sk, causal, *window)
    if skip == 0 and q.numel() > 0:
        return _backward_rows(dout, q, k, v, out, lse, left, right, scale)
    # Rows that saw nothing have no gradient; with no row left, k and v have none either.
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if skip < Sq and q.numel() > 0:
        dq[:, skip:], dk[:], dv[:] = _backward_rows(dout[:, skip:], q[:, skip:], k, v, out[:, skip:],
                                                    lse[..., skip:], left, right, scale)
    return dq, dk, dv


def _backward_rows(dout, q, k, v, out, lse, left, right, scale):
    is_causal, mask = _mask_args(q.shape[1], k.shape[1], left, right, q.dtype, q.device)
    t = lambda x: x.transpose(1, 2)  # noqa: E731
    grads = _FLASH_BWD(t(dout), t(q), t(k), t(v), t(out), lse.to(_lse_dtype(q.dtype)), 0.0, is_causal,
                       attn_mask=mask, scale=scale)
    return tuple(t(g) for g in grads)


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


def forward_packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, scale):
    """q (Tq, H, D), k/v (Tk, K, D) -> out (Tq, H, D), lse (H, Tq) fp32 (fp64 for fp64)."""
    runs = _runs(cu_seqlens_q, cu_seqlens_k)
    Tq, H, D = q.shape
    if len(runs) == 1 and runs[0][2] * runs[0][3] == Tq:  # one run covers every query: no copy
        qr, kr, vr = _run_views(runs[0], (q, "q"), (k, "k"), (v, "k"))
        o, l = forward(qr, kr, vr, causal, window, scale)
        return o.reshape(Tq, H, D), l.transpose(0, 1).reshape(H, Tq)
    out = q.new_zeros(Tq, H, D)  # sequences without keys stay zero
    lse = torch.full((H, Tq), float("-inf"), dtype=_lse_dtype(q.dtype), device=q.device)
    for run in runs:
        q0, _, n, sq, _ = run
        qr, kr, vr = _run_views(run, (q, "q"), (k, "k"), (v, "k"))
        o, l = forward(qr, kr, vr, causal, window, scale)
        out[q0:q0 + n * sq] = o.flatten(0, 1)
        lse[:, q0:q0 + n * sq] = l.transpose(0, 1).flatten(1)
    return out, lse


def backward_packed(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, window, scale):
    """(dq, dk, dv) shaped like the packed q, k, v."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for run in _runs(cu_seqlens_q, cu_seqlens_k):
        q0, k0, n, sq, sk = run
        dor, qr, kr, vr, outr = _run_views(run, (dout, "q"), (q, "q"), (k, "k"), (v, "k"), (out, "q"))
        lr = lse[:, q0:q0 + n * sq].unflatten(1, (n, sq)).transpose(0, 1)  # (n, H, Sq)
        g = backward(dor, qr, kr, vr, outr, lr, causal, window, scale)
        dq[q0:q0 + n * sq] = g[0].flatten(0, 1)
        dk[k0:k0 + n * sk] = g[1].flatten(0, 1)
        dv[k0:k0 + n * sk] = g[2].flatten(0, 1)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------
# attention over a KV cache whose rows hold different lengths
# ---------------------------------------------------------------------------------------


def kvcache_forward(q, k_cache, v_cache, seqlens_k: list[int], causal: bool, window: tuple[int, int],
                    scale: float) -> torch.Tensor:
    """q (B, Sq, H, D), caches (B, S_max, K, D), row b attending to its first seqlens_k[b] keys
    (bottom-right aligned diagonal per row) -> (B, Sq, H, D) contiguous in q's dtype.

    Rows of equal length (decode of one sequence, or a batch in lockstep): one call on views of
    the caches, no copy. Rows of different lengths: one call over the longest row with a
    (B, 1, Sq, L) mask, on a copy of the caches' first L positions in which everything past a
    row's length is zero (the kernel would multiply the garbage there by 0: NaN stays NaN).
    """
    B, Sq, H, D = q.shape
    L = max(seqlens_k, default=0)
    if q.numel() == 0 or min(seqlens_k) == L:
        return forward(q, k_cache[:, :L], v_cache[:, :L], causal, window, scale)[0]
    left, right = window
    if causal:
        right = 0
    # A copy with zeros past each row's keys. Clone + zero_ per row: torch.where with a
    # broadcast (B, L, 1, 1) condition took 5x longer (300 vs 61 us at B=2, L=257, K=8, D=128).
    k, v = k_cache[:, :L].clone(), v_cache[:, :L].clone()
    for b, n in enumerate(seqlens_k):
        if n < L:
            k[b, n:].zero_()
            v[b, n:].zero_()
    lengths = torch.tensor(seqlens_k, device=q.device)
    visible = _visible(Sq, lengths[:, None, None], L, left, right, q.device)  # (B, Sq, L)
    # Query i of row b sees nothing iff Sk_b = 0 or i < Sq - Sk_b - right (see _plan): never
    # when k/v were appended (Sk_b >= Sq). Such a row attends to the zeroed keys instead of
    # none (the kernel's fully masked rows are not part of its contract), then is zeroed.
    shortest = min(seqlens_k)
    has_empty = shortest == 0 or (right >= 0 and shortest < Sq - right)
    if has_empty:
        empty = ~visible.any(dim=-1)  # (B, Sq)
        visible = visible | empty[..., None]
    out, _ = _FLASH(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, False,
                    attn_mask=_additive(visible[:, None], q.dtype), scale=scale)
    out = out.transpose(1, 2)
    if has_empty:
        out = out.masked_fill(empty[..., None, None], 0)
    return out
