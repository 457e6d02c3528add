"""contrastive_loss: Triton kernels (interpreter on CPU) and the torch backend vs matmul + cross_entropy.

The oracle is written here, independently of grit_kernels/reference: F.normalize, a matmul
and F.cross_entropy in fp64 (high precision) and in the inputs' dtype (the low-precision
reference of DESIGN's tolerance rule).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from grit_kernels import contrastive_loss
from grit_kernels.triton import contrastive_loss as tri

from helpers import assert_close_to_oracle, compile_for_sm90


def oracle(q, d, targets=None, *, temperature=0.02, normalize=True, reduction="mean", dtype=torch.float64):
    B, N = q.shape[0], d.shape[0]
    if targets is None:
        targets = torch.arange(B, device=q.device) * (N // B)
    qq, dd = q.to(dtype), d.to(dtype)
    if normalize:
        qq, dd = F.normalize(qq, dim=-1), F.normalize(dd, dim=-1)
    return F.cross_entropy((qq @ dd.T) / temperature, targets.long(), reduction=reduction)


def loss_and_grads(fn, q, d, reduction, weights):
    q = q.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    loss = fn(q, d)
    scalar = (loss.double() * weights).sum() if reduction == "none" else loss
    dq, dd = torch.autograd.grad(scalar, (q, d))
    return loss, dq, dd


def check_against_oracle(q, d, targets, *, temperature, normalize, reduction, atol):
    """Loss, dq and dd of the op vs the fp64 oracle, bounded by the input-dtype oracle's error."""
    w = torch.rand(q.shape[0], dtype=torch.float64, device=q.device) + 0.5  # upstream grads of a "none" loss
    kw = dict(temperature=temperature, normalize=normalize, reduction=reduction)
    out = loss_and_grads(lambda a, b: contrastive_loss(a, b, targets=targets, **kw), q, d, reduction, w)
    hp = loss_and_grads(lambda a, b: oracle(a, b, targets, **kw), q, d, reduction, w)
    lp = loss_and_grads(lambda a, b: oracle(a, b, targets, dtype=q.dtype, **kw), q, d, reduction, w)
    assert out[0].dtype == torch.float32
    assert out[1].dtype == q.dtype and out[2].dtype == d.dtype
    for name, o, h, l in zip(("loss", "dq", "dd"), out, hp, lp):
        assert_close_to_oracle(o, h, l, atol=atol, name=name)


SHAPES = [  # (B, N, D, explicit targets)
    (1, 1, 1, False),
    (1, 5, 3, False),
    (3, 7, 5, True),     # N not a multiple of B: explicit targets
    (4, 8, 1, False),    # D = 1
    (4, 8, 257, False),  # D past a power of two
    (6, 12, 16, True),
    (20, 60, 33, False), # several row blocks, column tiles and splits at the interpreter's 16x16 tiles
]


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("B,N,D,explicit", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fp32_matches_oracle(backend, B, N, D, explicit, reduction):
    q, d = torch.randn(B, D), torch.randn(N, D)
    targets = torch.randint(0, N, (B,)) if explicit else None
    check_against_oracle(q, d, targets, temperature=0.02, normalize=True, reduction=reduction, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("B,N,D", [(3, 7, 5), (20, 60, 33)])
def test_unnormalized_and_other_temperature(backend, B, N, D):
    q, d = torch.randn(B, D) * 0.3, torch.randn(N, D) * 0.3
    targets = torch.randint(0, N, (B,), dtype=torch.int32)
    for reduction in ("mean", "none"):
        check_against_oracle(q, d, targets, temperature=0.7, normalize=False, reduction=reduction, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_backward_in_column_groups(backend, monkeypatch):
    """The backward's bounded H buffer: force several column groups (dq summed over groups)."""
    B, N, D = 20, 70, 24
    monkeypatch.setattr(tri, "MAX_GROUP_BYTES", B * 4 * 16)  # one 16-column tile per group
    q, d = torch.randn(B, D), torch.randn(N, D)
    targets = torch.randint(0, N, (B,))
    check_against_oracle(q, d, targets, temperature=0.02, normalize=True, reduction="mean", atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("B,N,D", [(4, 8, 64), (20, 40, 33)])
def test_fp16_matches_oracle(backend, B, N, D):
    q, d = torch.randn(B, D).half(), torch.randn(N, D).half()
    # Push the positives towards their queries so the losses are not all ~log N.
    d[torch.arange(B) * (N // B)] += q
    check_against_oracle(q, d, None, temperature=0.02, normalize=True, reduction="mean", atol=2e-3)


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("normalize", [True, False])
def test_fp16_large_norms_stay_finite(backend, normalize):
    """Rows of norm ~5e3 (squares past fp16's 65504) at T = 0.02: logits up to 50 when
    normalised, ~1e9 when not. Everything finite, and close to the fp64 oracle."""
    B, N, D = 6, 12, 257
    q = (torch.randn(B, D) * 300).half()
    d = (torch.randn(N, D) * 300).half()
    d[torch.arange(B) * 2] = q  # exact positives: the largest logits
    kw = dict(temperature=0.02, normalize=normalize)
    for reduction in ("mean", "none"):
        w = torch.rand(B, dtype=torch.float64) + 0.5
        loss, dq, dd = loss_and_grads(lambda a, b: contrastive_loss(a, b, reduction=reduction, **kw), q, d, reduction, w)
        for name, t in (("loss", loss), ("dq", dq), ("dd", dd)):
            assert torch.isfinite(t).all(), f"{name} not finite"
        ref_loss, ref_dq, ref_dd = loss_and_grads(lambda a, b: oracle(a, b, reduction=reduction, **kw), q, d,
                                                  reduction, w)
        assert torch.isfinite(ref_loss).all()
        scale = max(1.0, ref_loss.abs().max().item())
        torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=1e-3 * scale)
        for name, got, want in (("dq", dq, ref_dq), ("dd", dd, ref_dd)):
            err = (got.double() - want).abs().max().item()
            assert err <= 1e-2 * want.abs().max().item() + 1e-7, f"{name}: error {err:.3e}"


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
def test_fp16_unnormalized_sums_past_fp16_range(backend):
    """512 queries of entries ~300, all with document 0 as positive: dL/dd_0 sums 512 of
    them (~1.5e5, past fp16's 65504) before the 1 / (B T) factor brings it back to ~0.03.
    The gradient is representable, so it must come out finite and right."""
    B, N, D = 512, 4, 16
    q = (300 + 10 * torch.randn(B, D)).half()
    d = (0.1 * torch.randn(N, D)).half()
    targets = torch.zeros(B, dtype=torch.int64)
    kw = dict(targets=targets, temperature=1e4, normalize=False)
    loss, dq, dd = loss_and_grads(lambda a, b: contrastive_loss(a, b, **kw), q, d, "mean", None)
    want = loss_and_grads(lambda a, b: oracle(a, b, **kw), q, d, "mean", None)
    assert torch.isfinite(dd).all() and torch.isfinite(dq).all()
    torch.testing.assert_close(loss.double(), want[0].double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(dq.double(), want[1].double(), rtol=1e-2, atol=1e-7)
    torch.testing.assert_close(dd.double(), want[2].double(), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_default_targets_are_gritlm_groups(backend):
    B, N, D = 5, 15, 8
    q, d = torch.randn(B, D), torch.randn(N, D)
    got = contrastive_loss(q, d, reduction="none")
    explicit = contrastive_loss(q, d, targets=torch.arange(B) * 3, reduction="none")
    torch.testing.assert_close(got, explicit, rtol=0, atol=0)
    shifted = contrastive_loss(q, d, targets=torch.arange(B) * 3 + 1, reduction="none")
    assert not torch.allclose(got, shifted)  # the targets do matter
    torch.testing.assert_close(got.double(), oracle(q, d, reduction="none"), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_non_contiguous_inputs_and_determinism(backend):
    qT, dT = torch.randn(9, 4), torch.randn(9, 8)  # (D, B) and (D, N): transposed views
    q, d = qT.T, dT.T
    assert not q.is_contiguous()
    first = loss_and_grads(lambda a, b: contrastive_loss(a, b), q, d, "mean", None)
    again = loss_and_grads(lambda a, b: contrastive_loss(a, b), q.contiguous(), d.contiguous(), "mean", None)
    for x, y in zip(first, again):
        assert torch.equal(x, y)  # same bits: no atomics, fixed merge order
    torch.testing.assert_close(first[0].double(), oracle(q, d), rtol=1e-5, atol=1e-5)


class _Allocations(TorchDispatchMode):
    """Largest tensor an op returns while active (numel). The interpreter's own staging of
    kernel arguments (copy_/set_ on byte storages) is not the op's memory and is skipped."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.__name__.split(".")[0] in ("copy_", "set_"):
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_triton_never_holds_the_logits(monkeypatch):
    """Forward: nothing of B x N (only O(splits * B) partials). Backward: the H buffer is
    capped by MAX_GROUP_BYTES, far below B x N here; the largest tensors are the (., D) grads."""
    B, N, D = 48, 96, 4
    q, d = torch.randn(B, D), torch.randn(N, D)
    targets = torch.arange(B) * 2
    with _Allocations() as fwd:
        loss, lse, a, b = tri.forward(q, d, targets, 0.02, True)
    assert fwd.largest < B * N // 8, fwd.largest
    monkeypatch.setattr(tri, "MAX_GROUP_BYTES", B * 4 * 16)
    with _Allocations() as bwd:
        tri.backward(torch.full((B,), 1.0 / B), q, d, targets, lse, a, b, 0.02, True)
    assert bwd.largest <= max(B * 16, N * D, B * D), bwd.largest
    torch.testing.assert_close(loss.double(), oracle(q, d, targets, reduction="none"), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def _bad_cases():
    q, d = torch.randn(4, 8), torch.randn(8, 8)
    t = torch.tensor([0, 1, 2, 3])
    return [
        (dict(q=q, d=torch.randn(8, 7)), ValueError, r"^d: .*D = 8"),
        (dict(q=q, d=torch.randn(6, 8)), ValueError, r"^targets: .*multiple of B"),
        (dict(q=q, d=d, targets=torch.tensor([0, 1, 2, 8])), ValueError, r"^targets: .*got 8"),
        (dict(q=q, d=d, targets=torch.tensor([0, -1, 2, 3])), ValueError, r"^targets: .*got -1"),
        (dict(q=q, d=d, targets=t[:3]), ValueError, r"^targets: expected shape"),
        (dict(q=q, d=d, targets=t.float()), TypeError, r"^targets: expected dtype"),
        (dict(q=q, d=d, temperature=0.0), ValueError, r"^temperature: .*> 0"),
        (dict(q=q, d=d, temperature=-0.5), ValueError, r"^temperature: "),
        (dict(q=q, d=d, temperature=float("nan")), ValueError, r"^temperature: "),
        (dict(q=q, d=d, temperature=torch.tensor(0.1)), TypeError, r"^temperature: "),
        (dict(q=torch.randn(0, 8), d=d), ValueError, r"^q: empty batch"),
        (dict(q=q, d=torch.randn(0, 8)), ValueError, r"^d: no documents"),
        (dict(q=torch.randn(4, 0), d=torch.randn(8, 0)), ValueError, r"^q: .*D >= 1"),
        (dict(q=q[0], d=d), ValueError, r"^q: expected 2 dimensions"),
        (dict(q=q.long(), d=d), TypeError, r"^q: expected dtype"),
        (dict(q=q, d=d.half()), TypeError, r"^d: expected the dtype of q"),
        (dict(q=q, d=d, reduction="avg"), ValueError, r"^reduction: "),
        (dict(q=q, d=d, normalize=1), TypeError, r"^normalize: "),
        (dict(q=q, d=d, gather=True), ValueError, r"^gather: .*torch.distributed"),
        (dict(q=q.tolist(), d=d), TypeError, r"^q: expected a torch.Tensor"),
    ]


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_naming_the_argument(backend, case):
    kwargs, err, pattern = _bad_cases()[case]
    q, d = kwargs.pop("q"), kwargs.pop("d")
    with pytest.raises(err, match=pattern):
        contrastive_loss(q, d, **kwargs)


# ---------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
def test_opcheck(backend):
    q = torch.randn(5, 6, requires_grad=True)
    d = torch.randn(10, 6, requires_grad=True)
    targets = torch.arange(5) * 2
    torch.library.opcheck(torch.ops.grit.contrastive_loss.default, (q, d, targets, 0.05, True, True))
    torch.library.opcheck(torch.ops.grit.contrastive_loss.default, (q, d, targets, 0.5, False, False))
    loss, lse, a, b = torch.ops.grit.contrastive_loss(q.detach(), d.detach(), targets, 0.05, True, False)
    torch.library.opcheck(torch.ops.grit.contrastive_loss_backward.default,
                          (torch.rand(5), q.detach(), d.detach(), targets, lse, a, b, 0.05, True))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(q, d):
        return contrastive_loss(q, d, temperature=0.05)

    q = torch.randn(4, 8, requires_grad=True)
    d = torch.randn(8, 8, requires_grad=True)
    loss = step(q, d)
    loss.backward()
    q2, d2 = q.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    want = oracle(q2, d2, temperature=0.05)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.grad.double(), q2.grad.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d.grad.double(), d2.grad.double(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# compiled for sm_90 without a GPU: what the interpreter lets through (non-constexpr
# globals, dot shapes and layouts, the GPU tile sizes)
# ---------------------------------------------------------------------------------------

# Every kernel built as the launchers launch it on a GPU: tiles, num_warps and num_stages from
# _config() of a CUDA tensor (row kernels: the defaults), and the JIT's specialisation of the
# argument values (pointers 16-byte aligned, ints divisible by 16 marked so, ints equal to 1
# constexpr), for a GritLM batch and for odd sizes.
_AOT_SCRIPT = r"""
from types import SimpleNamespace

import torch
from grit_kernels.triton import contrastive_loss as m

def loss(dt, B, N, D, precisions):
    cfg = dict(m._config(SimpleNamespace(dtype=getattr(torch, dt), device=torch.device("cuda"))))
    opts = (cfg.pop("num_warps"), cfg.pop("num_stages"))
    p, f32 = {"bfloat16": "*bf16", "float32": "*fp32"}[dt], "*fp32"
    block_d = min(triton.next_power_of_2(D), 1024)
    for normalize, hat in ((False, False), (True, False), (True, True)):  # forward; backward's x-hat
        compile_launch(m._row_scale_kernel, dict(x_ptr=p, inv_ptr=f32, xhat_ptr=p if hat else f32, D=D, scale=50.0,
                                                 eps=m.NORM_EPS), dict(NORMALIZE=normalize, WRITE_HAT=hat, BLOCK_D=block_d))
    for prec in precisions:
        compile_launch(m._fwd_kernel, dict(q_ptr=p, d_ptr=p, a_ptr=f32, b_ptr=f32, tgt_ptr="*i64", m_ptr=f32,
                                           z_ptr=f32, t_ptr=f32, B=B, N=N, D=D, cols_per_split=2 * cfg["BLOCK_N"]),
                       dict(PREC=prec, **cfg), *opts)
        compile_launch(m._bwd_grad_logits_kernel, dict(q_ptr=p, d_ptr=p, a_ptr=f32, b_ptr=f32, tgt_ptr="*i64",
                                                       lse_ptr=f32, g_ptr=f32, h_ptr=p, B=B, N=N, D=D, c0=0, nc=N),
                       dict(PREC=prec, **cfg), *opts)
    for g in sorted({p, f32}):  # dL/dq-hat in fp32 when summed over several column groups
        for normalize in (False, True):
            compile_launch(m._project_kernel, dict(g_ptr=g, x_ptr=p, inv_ptr=f32, scale_ptr=f32, out_ptr=p, D=D,
                                                   eps=m.NORM_EPS), dict(NORMALIZE=normalize, BLOCK_D=block_d))

# fp32 follows torch's allow_tf32 (ieee by default); bf16/fp16 pass "ieee" (unused by their dots).
loss("bfloat16", 2048, 4096, 4096, ["ieee"])
loss("bfloat16", 300, 1025, 257, ["ieee"])
loss("float32", 2048, 4096, 4096, ["ieee", "tf32"])
"""


def test_kernels_compile_for_sm90():
    """Row-scale, forward, backward-logits and projection kernels, compiled ahead of time for H100."""
    compile_for_sm90(_AOT_SCRIPT, "contrastive_loss")


# ---------------------------------------------------------------------------------------
# GPU (bf16 needs real tensor cores: the interpreter's bf16 tl.dot is wrong)
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,N,D", [(1, 3, 64), (97, 194, 4096), (300, 1025, 257)])
def test_gpu_matches_oracle(monkeypatch, dtype, B, N, D):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    q = torch.randn(B, D, device="cuda").to(dtype)
    d = torch.randn(N, D, device="cuda").to(dtype)
    targets = torch.randint(0, N, (B,), device="cuda")
    atol = 1e-4 if dtype == torch.float32 else 2e-3
    check_against_oracle(q, d, targets, temperature=0.02, normalize=True, reduction="mean", atol=atol)


@pytest.mark.gpu
def test_gpu_bf16_large_norms_finite(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    q = (torch.randn(256, 4096, device="cuda") * 1e3).bfloat16().requires_grad_()
    d = (torch.randn(512, 4096, device="cuda") * 1e3).bfloat16().requires_grad_()
    loss = contrastive_loss(q, d)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()
