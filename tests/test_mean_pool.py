"""mean_pool on every backend vs the plain-PyTorch reference run in fp64.

CPU: torch (reference), cuda (csrc's host build of the kernel arithmetic), triton
(interpreter). GPU-marked: the CUDA kernels and Triton compiled for the device.
"""

from __future__ import annotations

import pytest
import torch

import grit_kernels
from grit_kernels import mean_pool
from grit_kernels.reference import mean_pool as ref
from helpers import compile_for_sm90, cu_seqlens_of, reduction_atol

CPU_BACKENDS = ["cpu", "cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def out_tol(expected, n_terms: int) -> dict:
    """Output: fp32 sums of exactly representable inputs, only the summation order differs
    from the oracle: the n-term rounding bound at the output's magnitude (n = pooled tokens
    plus D for the norm)."""
    return dict(rtol=0, atol=reduction_atol(expected, torch.float32, n_terms))


def grad_tol(expected, dtype, n_terms: int) -> dict:
    """Gradients: fp32 arithmetic (``out_tol``), then rounded to hidden's dtype, where the
    kernel and the rounded oracle may land one unit of that dtype apart."""
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=reduction_atol(expected, torch.float32, n_terms))


def padded_inputs(B, S, D, dtype, device="cpu", instruction=3):
    h = torch.randn(B, S, D, dtype=torch.float32).to(dtype).to(device)
    lengths = torch.randint(0, S + 1, (B,))
    lengths[0] = S  # one full row
    pos = torch.arange(S)
    m = (pos[None] < lengths[:, None]) & (pos[None] >= min(instruction, S - 1))
    return h, m.to(torch.int64).to(device)


def packed_inputs(lengths, skips, D, dtype, device="cpu"):
    cu = cu_seqlens_of(lengths, device)
    h = torch.randn(int(cu[-1]), D).to(dtype).to(device)
    return h, cu, torch.tensor(skips, dtype=torch.int32, device=device)


def fp64_grads_padded(h, m, g, normalize, weighted):
    x = h.detach().double().requires_grad_()
    (ref.mean_pool_padded(x, m, normalize=normalize, weighted=weighted, dtype=torch.float64) * g.double()).sum().backward()
    return x.grad


def fp64_grads_packed(h, cu, skip, g, normalize, weighted):
    x = h.detach().double().requires_grad_()
    y = ref.mean_pool_packed(x, cu, skip, normalize=normalize, weighted=weighted, dtype=torch.float64)
    (y * g.double()).sum().backward()
    return x.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,D", [(1, 1, 1), (2, 7, 33), (3, 97, 64), (2, 5, 4097)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_forward_backward(backend, dtype, B, S, D, normalize, weighted):
    h, m = padded_inputs(B, S, D, dtype)
    x = h.clone().requires_grad_()
    out = mean_pool(x, m, normalize=normalize, weighted=weighted)
    assert out.dtype == torch.float32 and out.shape == (B, D)
    expected = ref.mean_pool_padded(h, m, normalize=normalize, weighted=weighted, dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, **out_tol(expected, S + D))

    g = torch.randn(B, D)
    (out * g).sum().backward()
    assert x.grad.dtype == dtype
    want = fp64_grads_padded(h, m, g, normalize, weighted).to(dtype).double()
    torch.testing.assert_close(x.grad.double(), want, **grad_tol(want, dtype, S + D))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "lengths,skips",
    [
        ([7], [0]),
        ([7, 97, 1], [2, 5, 0]),
        ([5, 0, 3, 12], [5, 0, 4, 1]),  # skip == length, an empty row, skip > length
        ([1, 1, 1], [0, 1, 0]),
    ],
)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_packed_forward_backward(backend, dtype, lengths, skips, normalize, weighted):
    D = 40
    h, cu, skip = packed_inputs(lengths, skips, D, dtype)
    x = h.clone().requires_grad_()
    out = mean_pool(x, cu_seqlens=cu, skip=skip, normalize=normalize, weighted=weighted)
    expected = ref.mean_pool_packed(h, cu, skip, normalize=normalize, weighted=weighted, dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, **out_tol(expected, max(lengths) + D))
    for b, (n, k) in enumerate(zip(lengths, skips)):
        if k >= n:
            assert torch.equal(out[b], torch.zeros(D)), "a row with nothing to pool must be zeros"

    g = torch.randn(len(lengths), D)
    (out * g).sum().backward()
    want = fp64_grads_packed(h, cu, skip, g, normalize, weighted).to(dtype).double()
    torch.testing.assert_close(x.grad.double(), want, **grad_tol(want, dtype, max(lengths) + D))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_tokens_past_the_last_row_are_rejected(backend):
    """cu_seqlens must cover every packed token, as attention requires: trailing tokens are
    more likely a wrong offset than padding to ignore."""
    h, cu, skip = packed_inputs([4, 3], [1, 0], 16, torch.float32)
    h = torch.cat([h, torch.full((5, 16), 1e30)])
    with pytest.raises(ValueError, match="cu_seqlens: last entry 7 must equal the 12 packed tokens"):
        mean_pool(h, cu_seqlens=cu, skip=skip)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("layout", ["B=0", "S=0", "T=0"])
def test_empty_inputs(backend, layout):
    """Empty batches give empty or zero outputs on every backend (the cuda backend once read
    an empty tensor's null pointer as a missing argument)."""
    D = 8
    if layout == "B=0":
        args, kw, B = (torch.randn(0, 5, D), torch.ones(0, 5)), {}, 0
    elif layout == "S=0":
        args, kw, B = (torch.randn(3, 0, D), torch.ones(3, 0)), {}, 3
    else:
        args, kw, B = (torch.randn(0, D),), dict(cu_seqlens=cu_seqlens_of([0, 0]), skip=torch.zeros(2, dtype=torch.int32)), 2
    x = args[0].clone().requires_grad_()
    for normalize in (False, True):
        out = mean_pool(x, *args[1:], normalize=normalize, **kw)
        assert out.shape == (B, D) and torch.equal(out, torch.zeros(B, D))
        out.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_all_masked_rows_give_zeros_not_nan(backend):
    h = torch.randn(3, 6, 8)
    m = torch.zeros(3, 6)
    m[1, 2:] = 1.0  # float mask works too: nonzero = pooled
    for normalize in (False, True):
        x = h.clone().requires_grad_()
        out = mean_pool(x, m, normalize=normalize)
        assert torch.equal(out[0], torch.zeros(8)) and torch.equal(out[2], torch.zeros(8))
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert torch.equal(x.grad[0], torch.zeros(6, 8))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_packed_equals_padded(backend):
    """The instruction left out through skip equals it left out through the mask."""
    lengths, skips, D = [9, 4, 13], [3, 0, 5], 24
    h, cu, skip = packed_inputs(lengths, skips, D, torch.float32)
    S = max(lengths)
    padded = torch.zeros(len(lengths), S, D)
    mask = torch.zeros(len(lengths), S, dtype=torch.bool)
    for b, (n, k) in enumerate(zip(lengths, skips)):
        padded[b, :n] = h[cu[b]:cu[b + 1]]
        mask[b, k:n] = True
    for weighted in (False, True):
        a = mean_pool(h, cu_seqlens=cu, skip=skip, weighted=weighted, normalize=True)
        b = mean_pool(padded, mask, weighted=weighted, normalize=True)
        torch.testing.assert_close(a, b, **out_tol(b, S + D))


def test_matches_gritlm_pooling():
    """Against gritlm.GritLM.pooling itself (mean and weightedmean, instruction masked)."""
    gritlm = pytest.importorskip("gritlm.gritlm")
    h, m = padded_inputs(3, 11, 16, torch.float32)
    m[:, -1] = 1  # gritlm divides by zero on empty rows
    for method, weighted in (("mean", False), ("weightedmean", True)):
        obj = gritlm.GritLM.__new__(gritlm.GritLM)
        obj.pooling_method = method
        expected = gritlm.GritLM.pooling(obj, h, m.clone(), recast=False)
        torch.testing.assert_close(mean_pool(h, m, weighted=weighted), expected, **out_tol(expected, 11 + 16))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_opcheck(backend):
    h, m = padded_inputs(2, 5, 12, torch.float32)
    hp, cu, skip = packed_inputs([3, 0, 4], [1, 0, 2], 12, torch.float32)
    for normalize in (False, True):
        torch.library.opcheck(torch.ops.grit.mean_pool.default, (h.requires_grad_(), m, None, None, normalize, True))
        torch.library.opcheck(torch.ops.grit.mean_pool.default, (hp.requires_grad_(), None, cu, skip, normalize, False))


def test_torch_compile_fullgraph():
    h, m = padded_inputs(2, 6, 8, torch.float32)

    def embed(x, mask):
        return torch.nn.functional.relu(mean_pool(x * 2.0, mask, normalize=True)).sum()

    compiled = torch.compile(embed, fullgraph=True, backend="aot_eager")
    x1, x2 = h.clone().requires_grad_(), h.clone().requires_grad_()
    torch.testing.assert_close(compiled(x1, m), embed(x2, m))
    compiled(x1, m).backward()
    embed(x2, m).backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ---------------------------------------------------------------------------------------
# bad input: a clear error that names the argument
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: mean_pool(torch.randn(2, 3), torch.ones(2, 3)), "hidden"),  # rank 2 without cu_seqlens
        (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 4)), "mask"),  # mismatched S
        (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(3, 3)), "mask"),  # mismatched B
        (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3, 4)), "mask"),  # float mask of wrong shape
        (lambda: mean_pool(torch.randn(2, 3, 4)), "mask"),
        (lambda: mean_pool(torch.randn(2, 3, 4).long(), torch.ones(2, 3)), "hidden"),
        (lambda: mean_pool(torch.randn(2, 3, 0), torch.ones(2, 3)), "hidden"),
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 3, 6])), "cu_seqlens"),  # int64
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 4, 3], dtype=torch.int32)), "cu_seqlens"),
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([1, 4], dtype=torch.int32)), "cu_seqlens"),
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 7], dtype=torch.int32)), "cu_seqlens"),
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32),
                           skip=torch.tensor([1, -1], dtype=torch.int32)), "skip"),
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32),
                           skip=torch.tensor([1], dtype=torch.int32)), "skip"),
        (lambda: mean_pool(torch.randn(6, 4), torch.ones(6), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32)),
         "mask"),
        (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3), skip=torch.zeros(2, dtype=torch.int32)), "skip"),
        (lambda: mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3, device="meta")), "mask"),  # device mix
        (lambda: mean_pool(torch.randn(6, 4), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32, device="meta")),
         "cu_seqlens"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_forced_backend_unavailable_is_clear(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))
    monkeypatch.setenv("GRIT_BACKEND", "tpu")
    with pytest.raises(ValueError, match="GRIT_BACKEND"):
        mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))


# ---------------------------------------------------------------------------------------
# GPU: the CUDA kernels and compiled Triton
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,S,D", [(64, 512, 4096), (1, 4099, 4096), (3, 97, 4097), (5, 1, 1)])
@pytest.mark.parametrize("normalize,weighted", [(False, False), (True, True)])
def test_gpu_padded(backend, dtype, B, S, D, normalize, weighted):
    h, m = padded_inputs(B, S, D, dtype, device="cuda")
    x = h.clone().requires_grad_()
    out = mean_pool(x, m, normalize=normalize, weighted=weighted)
    expected = ref.mean_pool_padded(h, m, normalize=normalize, weighted=weighted, dtype=torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    g = torch.randn(B, D, device="cuda")
    (out * g).sum().backward()
    want = fp64_grads_padded(h, m, g, normalize, weighted).to(dtype).double()
    torch.testing.assert_close(x.grad.double(), want, **grad_tol(want, dtype, S + D))
    # Deterministic: no float atomics anywhere.
    assert torch.equal(mean_pool(h, m, normalize=normalize, weighted=weighted), out.detach())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_packed(backend, dtype):
    lengths = [7, 97, 0, 1, 3000, 513]
    skips = [2, 97, 0, 0, 40, 600]
    h, cu, skip = packed_inputs(lengths, skips, 4096, dtype, device="cuda")
    for weighted in (False, True):
        x = h.clone().requires_grad_()
        out = mean_pool(x, cu_seqlens=cu, skip=skip, normalize=True, weighted=weighted)
        expected = ref.mean_pool_packed(h, cu, skip, normalize=True, weighted=weighted, dtype=torch.float64)
        torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
        g = torch.randn(len(lengths), 4096, device="cuda")
        (out * g).sum().backward()
        want = fp64_grads_packed(h, cu, skip, g, True, weighted).to(dtype).double()
        torch.testing.assert_close(x.grad.double(), want, **grad_tol(want, dtype, max(lengths) + 4096))


@pytest.mark.gpu
def test_gpu_cpu_mix_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        mean_pool(torch.randn(2, 3, 4, device="cuda"), torch.ones(2, 3))


def test_public_names():
    assert "mean_pool" in dir(grit_kernels)
    with pytest.raises(AttributeError):
        grit_kernels.no_such_op  # noqa: B018


_AOT_SCRIPT = r"""
from grit_kernels.triton import mean_pool as m

for p in ("*bf16", "*fp32"):
    for packed in (False, True):
        for weighted in (False, True):
            ptrs = {"h_ptr": p, "w_ptr": "*fp32", "cu_ptr": "*i32", "skip_ptr": "*i32", "out_ptr": "*fp32",
                    "norm_ptr": "*fp32", "den_ptr": "*fp32", "dy_ptr": "*fp32", "dh_ptr": p}
            for fused in (False, True):
                build(m._mean_pool_fwd_kernel, ptrs, dict(PACKED=packed, WEIGHTED=weighted, FUSED_NORM=fused,
                                                          NORMALIZE=fused, BLOCK_S=8, BLOCK_D=1024))
            build(m._mean_pool_bwd_kernel, ptrs, dict(PACKED=packed, WEIGHTED=weighted, BLOCK_S=8, BLOCK_D=1024))
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter accepts things the compiler rejects (it once let a non-constexpr global through)."""
    compile_for_sm90(_AOT_SCRIPT, "mean_pool")
