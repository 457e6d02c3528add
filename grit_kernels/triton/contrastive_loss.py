"""In-batch contrastive loss in Triton: row-norm kernel, forward kernel, backward kernel, launchers.

Notation: q (B, D) queries, d (N, D) documents, a_i = 1 / (max(|q_i|, eps) * T) and
b_j = 1 / max(|d_j|, eps) (a_i = 1 / T, b_j = 1 without normalisation), so that

    s_ij = (q_i · d_j) * a_i * b_j          (the logits, never stored whole)
    loss_i = lse_i - s_i,t_i                 lse_i = logsumexp_j s_ij

The normalisation is fused: the tensor cores see the raw q and d in their own dtype and the
fp32 accumulator is scaled by a_i * b_j, so no normalised copy is made in the forward and
|s| <= 1 / T (50 at T = 0.02) whatever the inputs' norms. fp16 products of large-norm rows
cannot overflow either: tl.dot multiplies exactly and accumulates in fp32.

Forward: program (row block, column split) streams BLOCK_N tiles of d past a BLOCK_M block
of q (each tile a K-loop over D), keeps an online logsumexp (max m, sum z) per row and picks out the
target logit; splits of the N axis give the GPU enough programs when B is small (B = 2048,
BLOCK_M = 128: 16 row blocks for 132 SMs). The (splits, B) partials are merged in a fixed
order, so the result is deterministic. Extra memory: 3 * splits * B floats.

Backward: dL/ds_ij = g_i (p_ij - [j = t_i]) with p_ij = exp(s_ij - lse_i). With D = 4096
neither a row of dq nor a row of dd fits in registers, so a fused FA2-style backward would
have to recompute every logit tile D / BLOCK_D times. Instead the kernel below recomputes
the tiles once, for a bounded group of document columns at a time, and writes
H = g (p - onehot) / max|g| for that group in the inputs' dtype (|H| <= 1, so neither
fp16 nor bf16 under- or overflows); two cuBLAS GEMMs (deterministic, fp32 accumulation)
then give that group's dd in full and its share of dq. FLOPs: 2BND recompute + 2 * 2BND
GEMMs, the minimum for a recomputing backward. The GEMMs take the normalised q̂ and d̂
(a (B + N, D) copy made in the backward only), and a row kernel applies the Jacobian of
the normalisation to their (B, D) / (group, D) results in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import on_gpu, precision, sm_count

NORM_EPS = 1e-12
# Largest H group written by the backward (bytes). B = N / 2 = 8192 bf16 fits in one
# group (no dq accumulator); B = 16384 takes four. Tests lower it to exercise the groups.
MAX_GROUP_BYTES = 256 * 2**20


# ---------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------


@triton.jit
def _row_scale_kernel(x_ptr, inv_ptr, xhat_ptr, D, scale, eps,
                      NORMALIZE: tl.constexpr, WRITE_HAT: tl.constexpr, BLOCK_D: tl.constexpr):
    """inv[r] = scale / max(|x_r|, eps) (or just scale); optionally xhat_r = x_r * inv[r] / scale."""
    r = tl.program_id(0).to(tl.int64)
    if NORMALIZE:
        sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            sq += x * x
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(sq, axis=0)), eps)
    else:
        inv = 1.0
    tl.store(inv_ptr + r, inv * scale)
    if WRITE_HAT:
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            x = tl.load(x_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            tl.store(xhat_ptr + r * D + ks, (x * inv).to(xhat_ptr.dtype.element_ty), mask=ks < D)


@triton.jit
def _logit_tile(q_ptr, d_ptr, rows, cols, row_ok, col_ok, D,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                PREC: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 raw dot products q[rows] · d[cols] (0 where masked)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * D
    d_cols = d_ptr + cols.to(tl.int64)[None, :] * D
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        qt = tl.load(q_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        dt = tl.load(d_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(qt, dt, acc, input_precision=PREC)
    return acc


@triton.jit(do_not_specialize=["B", "N", "cols_per_split"])
def _fwd_kernel(
    q_ptr, d_ptr, a_ptr, b_ptr, tgt_ptr, m_ptr, z_ptr, t_ptr,
    B, N, D, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < B
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    n_start = split * cols_per_split
    n_end = tl.minimum(n_start + cols_per_split, N)

    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    z = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j exp(s_ij - m_i)
    t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # Every split holds at least one column (the launcher sizes them), so m is finite after
    # the first tile and exp(m - m_new) never sees -inf - -inf. Rows past B have a = 0: s = 0.
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        acc = _logit_tile(q_ptr, d_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
        s = acc * a[:, None] * b[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
    out = split.to(tl.int64) * B + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(z_ptr + out, z, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)


@triton.jit(do_not_specialize=["B", "N", "c0", "nc"])
def _bwd_grad_logits_kernel(
    q_ptr, d_ptr, a_ptr, b_ptr, tgt_ptr, lse_ptr, g_ptr, h_ptr,
    B, N, D, c0, nc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
):
    """h[i, j - c0] = g_i * (exp(s_ij - lse_i) - [j == t_i]) for columns c0 <= j < c0 + nc."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    local = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = c0 + local
    row_ok = rows < B
    col_ok = (local < nc) & (cols < N)
    acc = _logit_tile(q_ptr, d_ptr, rows, cols, row_ok, col_ok, D, BLOCK_M, BLOCK_N, BLOCK_K, PREC)
    a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    # s - lse <= 0 up to rounding, so exp stays in [0, 1] even for fp16 logits of 50.
    p = tl.exp(acc * a[:, None] * b[None, :] - lse[:, None])
    h = g[:, None] * (p - tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0))
    ptrs = h_ptr + rows.to(tl.int64)[:, None] * nc + local[None, :]
    tl.store(ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _project_kernel(g_ptr, x_ptr, inv_ptr, scale_ptr, out_ptr, D, eps,
                    NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr):
    """out_r = inv_r (v_r - x̂_r (x̂_r · v_r)) with v_r = scale * g_r, x̂_r = inv_r x_r: the
    Jacobian of x / max(|x|, eps) applied to dL/dx̂ (no radial term when |x| <= eps, where
    the division is by a constant). Without normalisation out_r = v_r. One row per program,
    fp32 inside, so the (rows, D) fp32 temporaries of doing this in torch never exist."""
    r = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr)
    if NORMALIZE:
        inv = tl.load(inv_ptr + r)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        sq = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            g = tl.load(g_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            dot += g * x
            sq += x * x
        big = tl.sqrt(tl.sum(sq, axis=0)) > eps
        radial = tl.where(big, tl.sum(dot, axis=0) * scale * inv * inv, 0.0)  # x̂ · v / |x| per unit x̂
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            g = tl.load(g_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            out = inv * (g * scale - x * radial)
            tl.store(out_ptr + r * D + ks, out.to(out_ptr.dtype.element_ty), mask=ks < D)
    else:
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            g = tl.load(g_ptr + r * D + ks, mask=ks < D, other=0.0).to(tl.float32)
            tl.store(out_ptr + r * D + ks, (g * scale).to(out_ptr.dtype.element_ty), mask=ks < D)


# ---------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------


def _config(x: torch.Tensor) -> dict:
    """Tile sizes and launch options. The interpreter runs numpy per block, so small tiles
    there keep CPU tests quick while still crossing tile, split and group boundaries."""
    if not on_gpu(x):
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32)
    if x.dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _input_precision(x: torch.Tensor) -> str:
    """fp32 inputs follow torch.matmul's rule (TF32 only when the user allowed it)."""
    return precision(x.dtype, on_gpu(x) and torch.backends.cuda.matmul.allow_tf32)


def row_scales(x: torch.Tensor, scale: float, normalize: bool, write_hat: bool = False):
    """x (R, D) -> (inv (R,) fp32 = scale / max(|x_r|, eps) or scale, x̂ (R, D) in x's dtype or None)."""
    R, D = x.shape
    inv = torch.empty(R, dtype=torch.float32, device=x.device)
    hat = torch.empty_like(x) if write_hat else None
    if R:
        block_d = min(triton.next_power_of_2(D), 1024)
        _row_scale_kernel[(R,)](x, inv, hat if write_hat else inv, D, float(scale), NORM_EPS,
                                NORMALIZE=normalize, WRITE_HAT=write_hat, BLOCK_D=block_d)
    return inv, hat


def _splits(B: int, N: int, cfg: dict, q: torch.Tensor) -> tuple[int, int]:
    """(number of column splits, columns per split, a multiple of BLOCK_N)."""
    tiles = triton.cdiv(N, cfg["BLOCK_N"])
    if on_gpu(q):
        sms = sm_count(q.device)
        want = triton.cdiv(2 * sms, triton.cdiv(B, cfg["BLOCK_M"]))
    else:
        want = 2
    per_split = triton.cdiv(tiles, max(1, min(want, tiles)))
    cols = per_split * cfg["BLOCK_N"]
    return triton.cdiv(N, cols), cols


def forward(q, d, targets, temperature: float, normalize: bool):
    """q (B, D), d (N, D) contiguous, same dtype; targets (B,) int64 in [0, N).

    Returns (loss (B,), lse (B,), a (B,), b (N,)), fp32; a and b as in the module docstring.
    """
    B, D = q.shape
    N = d.shape[0]
    a, _ = row_scales(q, 1.0 / temperature, normalize)
    b, _ = row_scales(d, 1.0, normalize)
    cfg = _config(q)
    n_splits, cols_per_split = _splits(B, N, cfg, q)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, z, t = (torch.empty((n_splits, B), **f32) for _ in range(3))
    grid = (triton.cdiv(B, cfg["BLOCK_M"]), n_splits)
    _fwd_kernel[grid](q, d, a, b, targets, m, z, t, B, N, D, cols_per_split,
                      PREC=_input_precision(q), **cfg)
    # Merge the splits' online-softmax states: O(splits * B), in a fixed order.
    m_max = m.max(dim=0).values
    lse = m_max + torch.log((z * torch.exp(m - m_max)).sum(dim=0))
    target_logit = t.sum(dim=0)  # one split holds the target, the others add exact zeros
    return lse - target_logit, lse, a, b


def backward(grad_loss, q, d, targets, lse, a, b, temperature: float, normalize: bool):
    """grad_loss (B,) fp32 = dL/dloss_i -> (dq (B, D), dd (N, D)) in the inputs' dtype."""
    B, D = q.shape
    N = d.shape[0]
    cfg = _config(q)
    # |g| <= 1 after this scale, so H = g (p - onehot) fits fp16 without underflow of the
    # rows that matter; the scale comes back as a factor of the GEMM results.
    g_scale = grad_loss.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    g = (grad_loss / g_scale).contiguous()
    if normalize:
        rq, q_hat = row_scales(q, 1.0, True, write_hat=True)
        rd, d_hat = row_scales(d, 1.0, True, write_hat=True)
        q_unit = d_unit = None
    else:
        rq, rd = None, None
        q_hat, q_unit = _fit_fp16(q)
        d_hat, d_unit = _fit_fp16(d)
    # H @ d̂ = dL/dq̂ * T / g_scale (divided by d's unit when it was rescaled); likewise H^T @ q̂.
    dq_scale = (g_scale / temperature).reshape(1)
    dd_scale = dq_scale.clone()
    if d_unit is not None:
        dq_scale = dq_scale * d_unit
    if q_unit is not None:
        dd_scale = dd_scale * q_unit

    elt = q.element_size()
    group = max(cfg["BLOCK_N"], (MAX_GROUP_BYTES // max(B * elt, 1)) // cfg["BLOCK_N"] * cfg["BLOCK_N"])
    group = min(group, triton.cdiv(N, cfg["BLOCK_N"]) * cfg["BLOCK_N"])
    dd = torch.empty_like(d)
    u = None  # dL/dq̂ * (T / g_scale), summed over groups in fp32 when there are several
    h_buf = torch.empty(B * min(group, N), dtype=q.dtype, device=q.device)
    precision = _input_precision(q)
    for c0 in range(0, N, group):
        nc = min(group, N - c0)
        hc = h_buf[: B * nc].view(B, nc)  # dense (B, nc): the kernel writes rows of nc
        grid = (triton.cdiv(B, cfg["BLOCK_M"]), triton.cdiv(nc, cfg["BLOCK_N"]))
        _bwd_grad_logits_kernel[grid](q, d, a, b, targets, lse, g, hc, B, N, D, c0, nc,
                                      PREC=precision, **cfg)
        w = hc.T @ q_hat  # (nc, D): this group's dL/dd̂ * (T / g_scale), complete
        _project(w, d[c0:c0 + nc], None if rd is None else rd[c0:c0 + nc], dd_scale, dd[c0:c0 + nc])
        part = hc @ d_hat[c0:c0 + nc]  # (B, D): this group's share of dL/dq̂
        if c0 + nc >= N and u is None:
            u = part  # a single group: no fp32 accumulator at all
        elif u is None:
            u = part.float()
        else:
            u += part.float()
    dq = torch.empty_like(q)
    _project(u, q, rq, dq_scale, dq)
    return dq, dd


def _fit_fp16(x):
    """Unnormalised fp16 GEMM operand and its unit: x / max|x| (and max|x|), else (x, None).

    H^T @ q sums up to B rows of q with weights |H| <= 1, which overflows fp16's 65504 for
    large entries (B = 512 rows of 300 already do); scaled to |x| <= 1 it stays below B.
    bf16 and fp32 have fp32's range and go through untouched.
    """
    if x.dtype != torch.float16:
        return x, None
    unit = torch.maximum(x.amax(), -x.amin()).float().clamp_min(torch.finfo(torch.float16).tiny).reshape(1)
    return (x / unit).to(torch.float16), unit


def _project(grad_hat, x, inv, scale, out):
    """out (R, D) = dL/dx from grad_hat = dL/dx̂ / scale, for x̂ = x * inv (identity when inv is None)."""
    R, D = x.shape
    if R == 0:
        return
    block_d = min(triton.next_power_of_2(D), 1024)
    _project_kernel[(R,)](grad_hat.contiguous(), x, inv if inv is not None else scale, scale, out, D, NORM_EPS,
                          NORMALIZE=inv is not None, BLOCK_D=block_d)
