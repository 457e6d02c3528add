"""The torch backend's fast CPU path (grit_kernels/ops/_sdpa_attention.py, PyTorch's fused CPU
attention kernel) vs the plain-PyTorch reference run in fp64.

Oracles never come from the path under test: grit_kernels.reference.attention.attention_ref
differentiated by autograd (fp64 and the inputs' dtype, helpers.assert_close_to_oracle) and
reference.attention_kvcache.attention_ref on caches appended by plain indexing. The
``fast_only`` fixture makes the reference's op functions raise, so that a test of a covered
case fails if the op quietly fell back to them.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from grit_kernels import attention_with_kvcache
from grit_kernels.cpu import attention as fast
from grit_kernels.reference import attention as ref_attention
from grit_kernels.reference import attention_kvcache as ref_kvcache
from grit_kernels.reference.attention import attention_ref, visible_mask

from helpers import assert_close_to_oracle, cu_seqlens_of
from helpers import ATTN_MODES as MODES
from helpers import check_attention, expected_caches, same
from helpers import check_kv as _kv_check_values
from helpers import opcheck_args as _opcheck_args
from helpers import packed_inputs as _packed
from helpers import padded_inputs as _padded


def check(q, k, v, *, lse_grad=False, atol=None, **kw):
    """The cpu backend vs the oracles; by default a loss of out only (the fused backward)."""
    return check_attention(q, k, v, atol=atol, lse_grad=lse_grad, **kw)




@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "cpu")


@pytest.fixture
def fast_only(monkeypatch):
    """The op's reference functions raise: the call must stay on the fast path."""
    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the reference")

    for module in (ref_attention, ref_kvcache):
        for name in ("forward", "backward"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


# ---------------------------------------------------------------------------------------
# the mask reduction, exhaustively against the reference's mask
# ---------------------------------------------------------------------------------------


def test_plan_matches_reference_mask():
    """Rows [0, skip) see nothing, all others see something, and the reduced window (and the
    kernel's top-left is_causal where chosen) gives the reference's mask on those rows."""
    sides = (-1, 0, 1, 2, 5)
    for Sq, Sk, causal, left, right in itertools.product(range(0, 7), range(0, 7), (False, True), sides, sides):
        want = visible_mask(Sq, Sk, causal, (left, right))
        skip, l2, r2 = fast._plan(Sq, Sk, causal, left, right)
        case = (Sq, Sk, causal, left, right)
        assert not want[:skip].any(), case
        assert want[skip:].any(dim=1).all(), case
        if skip == Sq:
            continue
        rows = Sq - skip
        is_causal, mask = fast._mask_args(rows, Sk, l2, r2, torch.float32, "cpu")
        if mask is not None:
            got = mask == 0
        elif is_causal:
            got = torch.ones(rows, Sk, dtype=torch.bool).tril()
        else:
            got = torch.ones(rows, Sk, dtype=torch.bool)
        assert torch.equal(got, want[skip:]), case


# ---------------------------------------------------------------------------------------
# attention, padded layout
# ---------------------------------------------------------------------------------------

LENGTHS = [(97, 97), (37, 70), (100, 171), (70, 37), (1, 50), (50, 1)]
LENGTH_IDS = ["Sq=Sk", "Sq<Sk", "Sq<Sk-merged", "Sq>Sk", "Sq=1", "Sk=1"]


@pytest.mark.parametrize("causal, window", MODES)
@pytest.mark.parametrize("Sq, Sk", LENGTHS, ids=LENGTH_IDS)
def test_modes_and_lengths(fast_only, causal, window, Sq, Sk):
    q, k, v = _padded(2, Sq, Sk, 2, 1, 64)
    check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal, window, Sq, Sk", [
    (False, (-1, -1), 90, 90), (True, (-1, -1), 90, 90), (True, (-1, -1), 80, 130), (False, (7, 3), 60, 45),
], ids=["bidir", "causal", "causal-Sq<Sk-merged", "window(7,3)-Sq>Sk"])
def test_low_precision(fast_only, dtype, causal, window, Sq, Sk):
    q, k, v = _padded(1, Sq, Sk, 4, 2, 64, dtype=dtype)
    check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("Hkv", [8, 2, 1], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (6, 2))],
                         ids=["bidir", "causal", "window(6,2)"])
def test_gqa(fast_only, Hkv, causal, window):
    q, k, v = _padded(2, 41, 41, 8, Hkv, 32)
    check(q, k, v, causal=causal, window=window)


@pytest.mark.parametrize("causal, window, Sq, Sk", [
    (False, (-1, -1), 20, 33), (True, (-1, -1), 70, 100), (True, (-1, -1), 20, 9), (False, (3, 4), 30, 12),
    (True, (5, -1), 90, 140),
], ids=["bidir-Sq<Sk", "causal-merged", "causal-Sq>Sk", "window-Sq>Sk", "causal-window-Sq<Sk"])
def test_lse_gradient(causal, window, Sq, Sk):
    """return_lse with lse in the loss: the forward stays fast, the backward is the reference's."""
    q, k, v = _padded(2, Sq, Sk, 4, 2, 32)
    check(q, k, v, lse_grad=True, causal=causal, window=window)


def test_rows_that_see_nothing(fast_only):
    """Zero output, lse -inf, zero gradients, no NaN: causal Sq > Sk, a window past the keys, no key."""
    q, k, v = _padded(1, 12, 5, 2, 1, 16)
    out, lse, dq, _, _ = check(q, k, v, causal=True)
    assert not out[:, :7].any() and torch.isneginf(lse[..., :7]).all() and not dq[:, :7].any()
    out, lse, dq, _, _ = check(q, k, v, window=(3, 1))  # rows i < 12 - 5 - 1 = 6 see nothing
    assert not out[:, :6].any() and torch.isneginf(lse[..., :6]).all() and out[:, 6:].abs().sum(-1).all()
    q, k, v = _padded(2, 9, 0, 2, 2, 16)
    out, lse, dq, dk, dv = check(q, k, v)
    assert not out.any() and torch.isneginf(lse).all() and not dq.any() and dk.numel() == 0


def test_softmax_scale_and_large_scores(fast_only):
    q, k, v = _padded(1, 45, 45, 2, 2, 32, scale=6.0)
    check(q, k, v, causal=True, softmax_scale=1.0)
    q, k, v = _padded(1, 20, 20, 2, 2, 32)
    check(q, k, v, softmax_scale=0.05, window=(3, 3))


def test_strided_inputs_from_a_fused_qkv(fast_only):
    qkv = torch.randn(2, 29, 8, 32)  # (B, S, Hq + 2 Hkv, D): q 4 heads, k and v 2 each
    q, k, v = qkv[:, :, :4], qkv[:, :, 4:6], qkv[:, :, 6:]
    assert not q.is_contiguous()
    check(q, k, v, causal=True)
    qkv = torch.randn(40, 8, 32)
    cu = cu_seqlens_of([13, 27])
    check(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], cu_seqlens_q=cu, cu_seqlens_k=cu, window=(6, 2))


# ---------------------------------------------------------------------------------------
# attention, packed layout
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (31, 0)), (True, (4, 0))],
                         ids=["bidir", "causal", "window(31,0)", "causal-window4"])
def test_packed_mixed_lengths(fast_only, causal, window):
    lens = [1, 300, 7, 7, 7, 1, 97, 33, 33, 2]  # runs of equal lengths share one kernel call
    q, k, v, cu = _packed(lens, lens, 4, 2, 32)
    check(q, k, v, causal=causal, window=window, **cu)


@pytest.mark.parametrize("causal, window", [(False, (-1, -1)), (True, (-1, -1)), (False, (4, 9))],
                         ids=["bidir", "causal", "window(4,9)"])
def test_packed_different_q_and_k_lengths(fast_only, causal, window):
    """Per sequence Sq != Sk, including empty sequences on either side and Sq > Sk."""
    lens_q = [1, 30, 0, 17, 5, 64, 90, 3, 3]
    lens_k = [1, 50, 3, 1, 0, 40, 130, 3, 3]
    q, k, v, cu = _packed(lens_q, lens_k, 4, 2, 32)
    check(q, k, v, causal=causal, window=window, max_seqlen_q=90, max_seqlen_k=130, **cu)


def test_packed_lse_gradient_and_one_sequence():
    lens = [5, 40, 1]
    q, k, v, cu = _packed(lens, lens, 4, 1, 16)
    check(q, k, v, lse_grad=True, causal=True, **cu)
    q, k, v, cu = _packed([77], [77], 4, 1, 16)  # one run covering every token
    check(q, k, v, causal=True, **cu)


def test_runs_group_consecutive_equal_lengths():
    cu_q, cu_k = cu_seqlens_of([3, 3, 0, 3, 5, 5, 2]), cu_seqlens_of([3, 3, 4, 3, 5, 6, 2])
    # The empty query sequence leaves keys between the 2nd and 3rd length-3 sequences: a new run.
    assert fast._runs(cu_q, cu_k) == [[0, 0, 2, 3, 3], [6, 10, 1, 3, 3], [9, 13, 1, 5, 5], [14, 18, 1, 5, 6],
                                      [19, 24, 1, 2, 2]]


# ---------------------------------------------------------------------------------------
# the registered ops: opcheck, and the reference still serves what the fast path does not
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("packed", [False, True], ids=["padded-causal-Sq<Sk", "packed"])
def test_opcheck(packed):
    """Both registered ops; the backward op with an unused (zero) lse gradient, the fast backward."""
    if packed:
        args = _opcheck_args(True)
    else:
        q, k, v = (t.requires_grad_() for t in _padded(2, 70, 90, 4, 2, 16))
        args = (q, k, v, None, None, -1, -1, True, -1, -1, 0.25)
    torch.library.opcheck(torch.ops.grit.attention.default, args)
    out, lse = (t.detach() for t in torch.ops.grit.attention(*args))
    q, k, v = (t.detach() for t in args[:3])
    bw_args = (torch.randn_like(out), torch.zeros_like(lse), q, k, v, out, lse, *args[3:])
    torch.library.opcheck(torch.ops.grit.attention_backward.default, bw_args)


def test_fp64_runs_the_fast_path(fast_only):
    """fp64 is not a public dtype, but the registered op takes it (tests' oracles may use it)."""
    q, k, v = _padded(1, 30, 40, 4, 2, 16, dtype=torch.float64)
    out, lse = torch.ops.grit.attention(q, k, v, None, None, -1, -1, True, -1, -1, 0.25)
    want, want_lse = attention_ref(q, k, v, causal=True, softmax_scale=0.25)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse.float())


# ---------------------------------------------------------------------------------------
# attention_with_kvcache
# ---------------------------------------------------------------------------------------


def _kv_check(out, q, kc, vc, seqlens_k, **kw):
    assert out.is_contiguous()
    _kv_check_values(out, q, kc, vc, seqlens_k=seqlens_k, **kw)


@pytest.mark.parametrize("Sq", [1, 3, 70])
@pytest.mark.parametrize("lengths", [[0, 17, 36], [20, 20, 20]], ids=["different", "equal"])
@pytest.mark.parametrize("causal, window", [
    (True, (-1, -1)), (True, (4, 0)), (False, (-1, -1)), (False, (3, 2)), (False, (-1, 1)),
], ids=["causal", "causal-(4,0)", "bidir", "bidir-(3,2)", "bidir-(-1,1)"])
def test_kvcache_rows_of_different_lengths(fast_only, Sq, lengths, causal, window):
    """NaN past each row's keys: a kernel that uses it, even with weight 0, outputs NaN; the
    append writes exactly the new slots."""
    B, Hq, Hkv, D = 3, 8, 2, 32
    S_max = max(lengths) + Sq + 5
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q, k, v = torch.randn(B, Sq, Hq, D), torch.randn(B, Sq, Hkv, D), torch.randn(B, Sq, Hkv, D)
    kc, vc = torch.randn(B, S_max, Hkv, D), torch.randn(B, S_max, Hkv, D)
    for b, n in enumerate(lengths):
        kc[b, n + Sq:] = float("nan")
        vc[b, n + Sq:] = float("nan")
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v, causal=causal, window=window, softmax_scale=0.2)
    assert same(kc, ekc) and same(vc, evc)
    assert torch.equal(seqlens, torch.tensor(lengths, dtype=torch.int32)), "cache_seqlens must not be advanced"
    _kv_check(out, q, ekc, evc, (seqlens + Sq).tolist(), causal=causal, window=window, softmax_scale=0.2)


@pytest.mark.parametrize("Hkv", [8, 2, 1], ids=["gqa1", "gqa4", "gqa8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_kvcache_decode_gqa_and_dtypes(fast_only, Hkv, dtype):
    B, Hq, D, S_max = 4, 8, 64, 300
    lengths = [250, 3, 120, 250]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    kc = torch.randn(B, S_max, Hkv, D).to(dtype)
    vc = torch.randn(B, S_max, Hkv, D).to(dtype)
    before_k, before_v = kc.clone(), vc.clone()
    q = torch.randn(B, 1, Hq, D).to(dtype)
    k, v = torch.randn(B, 1, Hkv, D).to(dtype), torch.randn(B, 1, Hkv, D).to(dtype)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v, window=(100, 0))
    changed = (kc != before_k).any(dim=(2, 3)) | (vc != before_v).any(dim=(2, 3))
    want = torch.zeros(B, S_max, dtype=torch.bool)
    for b, n in enumerate(lengths):
        want[b, n] = True
    assert torch.equal(changed, want), "nothing but the new slots is written"
    _kv_check(out, q, kc, vc, (seqlens + 1).tolist(), causal=True, window=(100, 0))


def test_kvcache_without_new_kv_and_empty_rows(fast_only):
    """No append: row b attends to cache[:cache_seqlens[b]]; an empty row, and rows that a
    causal Sq > Sk leaves without keys, give zeros, not NaN."""
    B, S_max, Hq, Hkv, D, Sq = 3, 24, 4, 2, 32, 5
    q = torch.randn(B, Sq, Hq, D)
    for lengths in ([7, 0, 3], [0, 0, 0], [2, 2, 2]):
        kc, vc = torch.randn(B, S_max, Hkv, D), torch.randn(B, S_max, Hkv, D)
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        for b, n in enumerate(lengths):
            kc[b, n:] = float("nan")
        before = kc.clone(), vc.clone()
        for causal in (True, False):
            out = attention_with_kvcache(q, kc, vc, seqlens, causal=causal)
            assert same(kc, before[0]) and same(vc, before[1])
            for b, n in enumerate(lengths):
                if n == 0:
                    assert torch.equal(out[b], torch.zeros_like(out[b]))
                elif causal and n < Sq:
                    assert not out[b, :Sq - n].any()
            _kv_check(out, q, kc, vc, lengths, causal=causal)


def test_kvcache_strided_caches(fast_only):
    B, S_max, Hq, Hkv, D, Sq = 2, 20, 4, 2, 64, 2
    kv = torch.randn(B, S_max, 2, Hkv, D)
    kc, vc = kv[:, :, 0], kv[:, :, 1]
    qkv = torch.randn(B, Sq, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    seqlens = torch.tensor([3, 7, 18, 0], dtype=torch.int32)[::2]
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    assert torch.equal(kv[:, :, 0], ekc) and torch.equal(kv[:, :, 1], evc)
    _kv_check(out, q, ekc, evc, (seqlens + Sq).tolist(), causal=True)


def test_kvcache_prefill_then_decode_equals_full_sequence(fast_only):
    """A prompt of 80 tokens after cached prefixes of different lengths (the lse-merged causal
    path when lengths agree), then decode, equals one causal pass over each row's stream."""
    B, Hq, Hkv, D = 2, 4, 2, 32
    for starts in ([5, 5], [0, 9]):
        prefill, decode = 80, 3
        L = max(starts) + prefill + decode
        q, k, v = torch.randn(B, L, Hq, D), torch.randn(B, L, Hkv, D), torch.randn(B, L, Hkv, D)
        kc = torch.full((B, L, Hkv, D), float("nan"))
        vc = torch.full((B, L, Hkv, D), float("nan"))
        for b, s in enumerate(starts):
            kc[b, :s], vc[b, :s] = k[b, :s], v[b, :s]
        seqlens = torch.tensor(starts, dtype=torch.int32)
        hp, _ = attention_ref(q.double(), k.double(), v.double(), causal=True)
        lp, _ = attention_ref(q, k, v, causal=True)
        for n in [prefill] + [1] * decode:
            idx = seqlens.long()[:, None] + torch.arange(n)
            take = lambda x: x[torch.arange(B)[:, None], idx]  # noqa: E731
            out = attention_with_kvcache(take(q), kc, vc, seqlens, take(k), take(v))
            for b in range(B):
                pos = idx[b]
                assert_close_to_oracle(out[b], hp[b, pos], lp[b, pos], atol=1e-5)
            seqlens += n
