"""attention: kernels vs the reference with an explicit mask, forward and gradients of q, k, v.

Oracles: grit_kernels.reference.attention.attention_ref differentiated by autograd, in fp64
(high precision) and in the kernel's dtype (low precision); see helpers.assert_close_to_oracle.
Every check also backpropagates a random gradient into lse, so its path is tested too.
CPU runs use the Triton interpreter in fp32 (and a few fp16) with small shapes; bf16 and
large shapes are in the tests marked gpu.
"""

from __future__ import annotations

import pytest
import torch

from grit_kernels import attention
from grit_kernels._backend import BackendUnavailableError
from grit_kernels.reference.attention import attention_ref, visible_mask

from helpers import ATTN_MODES as MODES
from helpers import assert_close_to_oracle, check_attention, compile_for_sm90, cu_seqlens_of
from helpers import opcheck_args as _opcheck_args
from helpers import packed_inputs as _packed_inputs
from helpers import padded_inputs as _padded_inputs

# ---------------------------------------------------------------------------------------
# the reference itself (independent of the kernels)
# ---------------------------------------------------------------------------------------


def test_reference_mask_matches_flash_attn_conventions():
    # causal, Sq < Sk: bottom-right aligned.
    assert visible_mask(2, 5, True, (-1, -1)).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # causal, Sq > Sk: the first rows see nothing.
    assert visible_mask(4, 2, True, (-1, -1)).int().tolist() == [[0, 0], [0, 0], [1, 0], [1, 1]]
    # window (1, 2), inclusive on both sides.
    assert visible_mask(4, 4, False, (1, 2)).int().tolist() == [
        [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]]
    # causal ignores the right side of the window.
    assert torch.equal(visible_mask(6, 6, True, (2, 3)), visible_mask(6, 6, False, (2, 0)))


def test_reference_matches_sdpa():
    q, k, v = _padded_inputs(2, 9, 9, 4, 2, 16)
    ke, ve = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k, v))
    for causal in (False, True):
        want = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), ke, ve, is_causal=causal)
        got, _ = attention_ref(q, k, v, causal=causal)
        torch.testing.assert_close(got, want.transpose(1, 2))


def test_check_detects_a_wrong_mask(monkeypatch):
    """The comparison can fail: a causal result is not accepted as bidirectional."""
    monkeypatch.setenv("GRIT_BACKEND", "cpu")
    q, k, v = _padded_inputs(1, 8, 8, 2, 2, 16)
    out = attention(q, k, v, causal=True)
    hp, _ = attention_ref(q.double(), k.double(), v.double(), causal=False)
    lp, _ = attention_ref(q, k, v, causal=False)
    with pytest.raises(AssertionError):
        assert_close_to_oracle(out, hp, lp, atol=1e-5)


# ---------------------------------------------------------------------------------------
# kernels vs the oracle (interpreter on CPU)
# ---------------------------------------------------------------------------------------




@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("causal, window", MODES)
@pytest.mark.parametrize("Sq, Sk", [(97, 97), (37, 70), (70, 37)], ids=["Sq=Sk", "Sq<Sk", "Sq>Sk"])
def test_modes_and_lengths(backend, causal, window, Sq, Sk):
    q, k, v = _padded_inputs(1, Sq, Sk, 2, 1, 64)
    check_attention(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("Hkv", [8, 2, 1], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_gqa(backend, Hkv, causal):
    q, k, v = _padded_inputs(1, 41, 41, 8, Hkv, 32)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("D", [16, 40, 64, 96, 128])
def test_head_dims(backend, D):
    q, k, v = _padded_inputs(1, 33, 33, 2, 1, D)
    check_attention(q, k, v, causal=True, window=(20, 0))


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (31, 0))],
                         ids=["bidir", "causal", "window(31,0)"])
def test_packed_mixed_lengths(backend, causal, window):
    lens = [1, 300, 7, 1, 97, 33, 2]
    q, k, v, cu = _packed_inputs(lens, lens, 2, 1, 64)
    check_attention(q, k, v, causal=causal, window=window, **cu)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 9))],
                         ids=["bidir", "causal", "window(4,9)"])
def test_packed_different_q_and_k_lengths(backend, causal, window):
    """Per sequence Sq != Sk, including empty sequences on either side."""
    lens_q = [1, 30, 0, 17, 5, 64]
    lens_k = [1, 50, 3, 1, 0, 40]
    q, k, v, cu = _packed_inputs(lens_q, lens_k, 4, 2, 32)
    check_attention(q, k, v, causal=causal, window=window, max_seqlen_q=64, max_seqlen_k=50, **cu)


@pytest.mark.parametrize("backend", ["triton", "cpu"], indirect=True)
@pytest.mark.parametrize("Sq, Sk, causal", [(1, 1, False), (1, 1, True), (1, 50, True), (50, 1, True),
                                            (1, 50, False), (7, 7, True)])
def test_one_token_and_tiny(backend, Sq, Sk, causal):
    q, k, v = _padded_inputs(3, Sq, Sk, 4, 2, 64)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_no_keys_gives_zeros(backend):
    """Rows that see nothing: zero output, lse -inf, zero gradients, no NaN."""
    q, k, v = _padded_inputs(1, 9, 0, 2, 2, 16)
    out, lse, dq, dk, dv = check_attention(q, k, v)
    assert not out.any() and torch.isneginf(lse).all() and not dq.any()
    q, k, v = _padded_inputs(1, 6, 3, 2, 2, 16)
    out, lse, *_ = check_attention(q, k, v, causal=True)
    assert not out[:, :3].any() and torch.isneginf(lse[..., :3]).all()


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_softmax_scale_and_large_scores(backend):
    """Scores near 1e3 saturate the softmax: no overflow, no NaN."""
    q, k, v = _padded_inputs(1, 45, 45, 2, 2, 32, scale=6.0)
    check_attention(q, k, v, causal=True, softmax_scale=1.0)
    q, k, v = _padded_inputs(1, 20, 20, 2, 2, 32)
    check_attention(q, k, v, softmax_scale=0.05, window=(3, 3))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_strided_inputs_from_a_fused_qkv(backend):
    """q, k, v sliced out of one (B, S, 3, H, D) projection (no copy needed) and packed views."""
    qkv = torch.randn(2, 29, 3, 4, 32)
    q, k, v = qkv.unbind(dim=2)
    assert not q.is_contiguous()
    check_attention(q, k, v, causal=True)
    qkv = torch.randn(40, 3, 2, 32)
    q, k, v = qkv.unbind(dim=1)
    check_attention(q, k, v, cu_seqlens_q=cu_seqlens_of([13, 27]), window=(6, 2))


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_batches_past_the_grid_limit_launch_in_slices(backend, packed, monkeypatch):
    """Grid dimension z (the batch) holds 65535 programs: longer batches go in slices. With
    the limit set to 2, five sequences take three launches of each kernel, none wider than 2,
    and every output and gradient still equals the oracles'."""
    from grit_kernels.triton import attention as tri

    monkeypatch.setattr(tri, "MAX_GRID_BATCH", 2)
    widths, launch = [], tri._launch
    def spy(which, kernel, fixed, grid_of, args, **constexprs):
        widths.append((which, grid_of(fixed)[2]))
        return launch(which, kernel, fixed, grid_of, args, **constexprs)
    monkeypatch.setattr(tri, "_launch", spy)
    if packed:
        q, k, v, cu = _packed_inputs([7, 1, 12, 5, 9], [3, 8, 12, 6, 9], 4, 2, 32)
        check_attention(q, k, v, causal=True, **cu)
    else:
        q, k, v = _padded_inputs(5, 11, 13, 4, 2, 32)
        check_attention(q, k, v, window=(4, 2))
    assert sorted(widths) == sorted([(w, n) for w in ("fwd", "dkdv", "dq") for n in (2, 2, 1)])


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_fp16_interpreter(backend, causal):
    q, k, v = _padded_inputs(1, 50, 50, 4, 1, 64, dtype=torch.float16)
    check_attention(q, k, v, causal=causal)


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_backward_is_deterministic(backend):
    """dK/dV of a KV head are summed over its query group in a fixed order (no atomics)."""
    q, k, v = _padded_inputs(1, 40, 40, 8, 2, 32)
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*ins, causal=True).square().sum().backward()
        runs.append([t.grad for t in ins])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_long_sequence(backend):
    q, k, v = _padded_inputs(1, 1025, 1025, 2, 1, 64)
    check_attention(q, k, v, causal=True)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_long_sequence_window_head_dim_128(backend):
    q, k, v = _padded_inputs(1, 600, 600, 2, 1, 128)
    check_attention(q, k, v, window=(128, 0))


# ---------------------------------------------------------------------------------------
# dispatch, registration, compile
# ---------------------------------------------------------------------------------------


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("GRIT_BACKEND", raising=False)
    q, k, v = _padded_inputs(1, 5, 5, 2, 2, 16)
    want, _ = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True), want)
    monkeypatch.setenv("GRIT_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="attention"):
        attention(q, k, v)


def test_return_lse_false_returns_out_only(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "cpu")
    q, k, v = _padded_inputs(1, 5, 5, 2, 2, 16)
    out = attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape


def test_gpu_configs_are_built_lazily():
    """Importing the kernels builds no autotuner; building one compiles nothing (no device here)."""
    from grit_kernels.triton import attention as tri

    if not torch.cuda.is_available():
        assert tri._tuned.cache_info().currsize == 0
    for which in ("fwd", "dkdv", "dq"):
        assert len(tri._tuned(which, True, False).configs) == len(tri._GPU_CONFIGS[which])
        assert len(tri._tuned(which, False, False).configs) == 1
        assert len(tri._tuned(which, True, True).configs) == len(tri._GPU_CONFIGS_FP32[which])





@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_opcheck(backend, packed):
    torch.library.opcheck(torch.ops.grit.attention.default, _opcheck_args(packed))


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_opcheck_backward_op(backend):
    q, k, v = _padded_inputs(1, 6, 6, 2, 1, 16)
    out, lse = attention(q, k, v, return_lse=True, causal=True)
    args = (torch.randn_like(out), torch.randn_like(lse), q, k, v, out, lse, None, None, -1, -1, True, -1, -1, 0.25)
    torch.library.opcheck(torch.ops.grit.attention_backward.default, args)


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
def test_torch_compile_fullgraph(backend):
    lens = [3, 9]
    q, k, v, cu = _packed_inputs(lens, lens, 4, 2, 16)

    def f(q, k, v):
        a = attention(q, k, v, causal=True, **cu, max_seqlen_q=9, max_seqlen_k=9)
        b = attention(q, k, v, window=(2, 2), **cu, max_seqlen_q=9, max_seqlen_k=9)
        return (a * b).sum()

    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    # aot_eager traces the op (fake kernels, autograd, functionalisation) like inductor does,
    # without a minute of C++ code generation on a CPU runner.
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(*ins).backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager).backward()
    for a, b in zip(ins, eager):
        torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, raised before anything runs
# ---------------------------------------------------------------------------------------


def _bad_cases():
    q, k, v = _padded_inputs(1, 4, 4, 4, 2, 16)
    lens = [2, 3]
    pq, pk, pv, cu = _packed_inputs(lens, lens, 4, 2, 16)
    cu_q = cu["cu_seqlens_q"]
    return [
        ("Hq % Hkv", ValueError, "^k:", (q, torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)), {}),
        ("D mismatch", ValueError, "^k:", (q, k[..., :8].contiguous(), v[..., :8].contiguous()), {}),
        ("v shape", ValueError, "^v:", (q, k, v[:, :3]), {}),
        ("window < -1", ValueError, "window", (q, k, v), dict(window=(-2, 0))),
        ("window not a pair", TypeError, "window", (q, k, v), dict(window=4)),
        ("window float", TypeError, "window", (q, k, v), dict(window=(1.5, 0))),
        ("causal not bool", TypeError, "causal", (q, k, v), dict(causal="yes")),
        ("non-contiguous last dim", ValueError, "^q:", (torch.randn(1, 4, 4, 32)[..., ::2], k, v), {}),
        ("non-contiguous last dim k", ValueError, "^k:", (q, torch.randn(1, 4, 2, 32)[..., ::2], v), {}),
        ("dtype mismatch", TypeError, "^k:", (q, k.half(), v), {}),
        ("integer q", TypeError, "^q:", (q.long(), k, v), {}),
        ("padded needs 4-D", ValueError, "^q:", (pq, pk, pv), {}),
        ("batch mismatch", ValueError, "^k:", (q, torch.cat([k, k]), torch.cat([v, v])), {}),
        ("head dim too big", ValueError, "^q:", (torch.randn(1, 2, 2, 300),) * 3, {}),
        ("softmax_scale nan", ValueError, "softmax_scale", (q, k, v), dict(softmax_scale=float("nan"))),
        # 0 gave NaN on the fused CPU path for causal rows (as PyTorch's own SDPA does)
        ("softmax_scale zero causal", ValueError, "softmax_scale: expected a finite number > 0", (q, k, v),
         dict(softmax_scale=0.0, causal=True)),
        ("softmax_scale negative", ValueError, "softmax_scale", (q, k, v), dict(softmax_scale=-1.0)),
        ("softmax_scale a string", TypeError, "softmax_scale", (q, k, v), dict(softmax_scale="0.1")),
        ("max_seqlen padded", ValueError, "max_seqlen_q", (q, k, v), dict(max_seqlen_q=4)),
        ("cu_seqlens_k alone", ValueError, "cu_seqlens_k", (q, k, v), dict(cu_seqlens_k=cu_q)),
        ("cu_seqlens dtype", TypeError, "cu_seqlens_q", (pq, pk, pv), dict(cu_seqlens_q=cu_q.long())),
        ("cu_seqlens 2-D", ValueError, "cu_seqlens_q", (pq, pk, pv), dict(cu_seqlens_q=cu_q[None])),
        ("cu_seqlens length", ValueError, "cu_seqlens_k", (pq, pk, pv),
         dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_q[:2].contiguous())),
        ("cu_seqlens last != T", ValueError, "cu_seqlens_q", (pq, pk, pv),
         dict(cu_seqlens_q=cu_seqlens_of([2, 2]), cu_seqlens_k=cu_q)),
        ("cu_seqlens decreasing", ValueError, "cu_seqlens_q", (pq, pk, pv),
         dict(cu_seqlens_q=torch.tensor([0, 4, 3, 5], dtype=torch.int32))),
        ("cu_seqlens start", ValueError, "cu_seqlens_q", (pq, pk, pv),
         dict(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32))),
        ("max_seqlen too small", ValueError, "max_seqlen_q", (pq, pk, pv), dict(cu_seqlens_q=cu_q, max_seqlen_q=2)),
        ("max_seqlen negative", ValueError, "max_seqlen_k", (pq, pk, pv), dict(cu_seqlens_q=cu_q, max_seqlen_k=-3)),
        ("device mix", ValueError, "^k:", (q, k.to("meta"), v), {}),
    ]


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input(backend, case):
    _name, exc, match, args, kwargs = case
    with pytest.raises(exc, match=match):
        attention(*args, **kwargs)


# ---------------------------------------------------------------------------------------
# compiled for sm_90 without a GPU: what the interpreter lets through (non-constexpr
# globals, dot shapes and layouts, constexpr branches never taken on CPU)
# ---------------------------------------------------------------------------------------

# Each kernel is built as the launcher would launch it: the first GPU config of each list
# (tiles, num_warps, num_stages: what GRIT_AUTOTUNE=0 runs; the autotuner's other
# configs for one case), the launcher's constexprs, and the JIT's specialisation of the
# argument values of a GritLM-sized call (pointers 16-byte aligned, ints divisible by 16
# marked so, ints equal to 1 constexpr).
_AOT_SCRIPT = r"""
from grit_kernels.triton import attention as m

def attention(dt, causal, window, packed, Hq, Hkv, D, config=0):
    # forward() and backward() of q (B, S, Hq, D) / packed (T, Hq, D), contiguous, with the
    # config-th GPU config of each list (kernels whose list is shorter are skipped).
    B, S = (1, 4096) if packed else (2, 2048)
    left, right = window
    right = 0 if causal else right
    p, cu = "*" + dt, ("*i32" if packed else "*fp32")  # padded: lse stands in for cu_seqlens
    def strides(**heads):
        out = {}
        for x, H in heads.items():
            out.update(zip((f"stride_{x}b", f"stride_{x}s", f"stride_{x}h"),
                           (0, H * D, D) if packed else (S * H * D, H * D, D)))
        return out
    lse = dict(stride_lb=0, stride_lh=B * S) if packed else dict(stride_lb=Hq * S, stride_lh=S)
    common = dict(SEQ_Q=S, SEQ_K=S, GROUP=Hq // Hkv, D=D, left=max(left, 0), right=max(right, 0),
                  SEQ_KEY_Q=S, SEQ_KEY_K=S, qk_scale=0.1)
    block_d = max(16, triton.next_power_of_2(D))
    flags = dict(PACKED=packed, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, PREC="ieee" if dt == "fp32" else "tf32",
                 BLOCK_D=block_d)
    configs = m._GPU_CONFIGS_FP32 if dt == "fp32" else m._GPU_CONFIGS
    def launch(which, fn, args):
        if config < len(configs[which]):
            bm, bn, warps, stages = configs[which][config]
            compile_launch(fn, args, dict(**flags, BLOCK_M=bm, BLOCK_N=bn), warps, stages)
    launch("fwd", m._attn_fwd_kernel, dict(Q=p, K=p, V=p, O=p, LSE="*fp32", CU_Q=cu, CU_K=cu,
           **strides(q=Hq, k=Hkv, v=Hkv, o=Hq), **lse, **common))
    for has_dlse in (False, True) if config == 0 else ():  # fixed tiles, default num_warps / num_stages
        compile_launch(m._bwd_preprocess_kernel, dict(O=p, DO=p, DLSE="*fp32", DELTA="*fp32", CU_Q=cu,
                       **strides(o=Hq, do=Hq), **lse, SEQ_Q=S, D=D),
                       dict(PACKED=packed, HAS_DLSE=has_dlse, BLOCK_M=64, BLOCK_D=block_d))
    launch("dkdv", m._attn_bwd_dkdv_kernel, dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DK=p, DV=p,
           CU_Q=cu, CU_K=cu, **strides(q=Hq, k=Hkv, v=Hkv, do=Hq, dk=Hkv, dv=Hkv), **lse, sm_scale=0.1, **common))
    launch("dq", m._attn_bwd_dq_kernel, dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", DQ=p,
           CU_Q=cu, CU_K=cu, **strides(q=Hq, k=Hkv, v=Hkv, do=Hq, dq=Hq), **lse, sm_scale=0.1, **common))

# (dtype, causal, window, packed, Hq, Hkv, D): every mask specialisation, both layouts, GQA
# groups 8, 4 and 1 (a constexpr), head dims 128 and 64. fp32 (ieee dots, its own small
# configs) at both head dims: its D = 128 kernels are recorded spill-free.
for case in [
    ("bf16", True, (-1, -1), False, 32, 8, 128),   # GritLM causal
    ("bf16", False, (-1, -1), True, 32, 8, 128),   # GritLM bidirectional, packed
    ("bf16", False, (256, 0), False, 32, 8, 128),  # left and right windows
    ("bf16", True, (4096, -1), True, 32, 8, 128),  # Mistral's sliding window
    ("fp16", False, (100, 37), True, 16, 2, 64),
    ("fp16", True, (-1, -1), False, 16, 16, 64),
    ("fp32", False, (-1, -1), True, 16, 4, 64),
    ("fp32", True, (-1, -1), False, 32, 8, 128),
]:
    attention(*case)
# The autotuner (on by default) compiles every config of the lists: the rest, for one case.
for config in range(1, max(map(len, m._GPU_CONFIGS.values()))):
    attention("bf16", True, (-1, -1), False, 32, 8, 128, config)
"""


def test_kernels_compile_for_sm90():
    """Forward, delta preprocess, dK/dV and dQ kernels, compiled ahead of time for H100."""
    compile_for_sm90(_AOT_SCRIPT, "attention")


# ---------------------------------------------------------------------------------------
# GPU (bf16/fp16, large shapes; run by bench/gpu_check.sh with GRIT_GPU_TESTS=1)
# ---------------------------------------------------------------------------------------


# Each GPU case below is a new kernel specialisation (flags, head dim, group, dtype); GPU runs
# default to GRIT_AUTOTUNE=0 (tests/conftest.py), so it compiles one config, not the list.
GPU_CASES = [
    pytest.param(torch.bfloat16, False, (-1, -1), 1025, 8, 2, 128, id="bf16-bidir-1025-gqa4-d128"),
    pytest.param(torch.bfloat16, True, (-1, -1), 4097, 4, 4, 64, id="bf16-causal-4097-d64"),
    pytest.param(torch.bfloat16, False, (256, 0), 1025, 8, 2, 128, id="bf16-window(256,0)-1025"),
    pytest.param(torch.bfloat16, False, (100, 37), 97, 16, 2, 96, id="bf16-window(100,37)-97-gqa8-d96"),
    pytest.param(torch.float16, True, (-1, -1), 1025, 8, 2, 128, id="fp16-causal-1025"),
    pytest.param(torch.float16, False, (-1, -1), 97, 16, 2, 96, id="fp16-bidir-97-d96"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, causal, window, S, Hq, Hkv, D", GPU_CASES)
def test_gpu_padded(dtype, causal, window, S, Hq, Hkv, D):
    q, k, v = _padded_inputs(2, S, S, Hq, Hkv, D, dtype=dtype, device="cuda")
    check_attention(q, k, v, causal=causal, window=window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, causal", [(torch.bfloat16, True), (torch.float32, False)], ids=["bf16-causal",
                                                                                                 "fp32-bidir"])
def test_gpu_packed_and_uneven(dtype, causal):
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 1500, (10,), generator=g).tolist() + [1, 3000]
    q, k, v, cu = _packed_inputs(lens, lens, 16, 4, 128, dtype=dtype, device="cuda")
    check_attention(q, k, v, causal=causal, **cu)
    q, k, v = _padded_inputs(3, 300, 1000, 8, 1, 128, dtype=dtype, device="cuda")
    check_attention(q, k, v, causal=causal)
    q, k, v = _padded_inputs(3, 1000, 300, 8, 1, 128, dtype=dtype, device="cuda")
    check_attention(q, k, v, causal=causal)


@pytest.mark.gpu
def test_gpu_opcheck_and_compile(monkeypatch):
    """Also the one GPU test that runs the autotuner (configs chosen on first use)."""
    monkeypatch.setenv("GRIT_AUTOTUNE", "1")
    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _opcheck_args(True))
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(torch.ops.grit.attention.default, args)
    q, k, v = _padded_inputs(2, 300, 300, 8, 2, 128, dtype=torch.bfloat16, device="cuda")
    f = torch.compile(lambda q, k, v: attention(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), attention(q, k, v, causal=True))


@pytest.mark.gpu
def test_gpu_deterministic_backward():
    q, k, v = _padded_inputs(2, 2048, 2048, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    runs = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*ins, causal=True).float().square().sum().backward()
        runs.append([t.grad for t in ins])
    for a, b in zip(*runs):
        assert torch.equal(a, b)

