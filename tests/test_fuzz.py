"""Property-based tests of every public op (hypothesis, fixed seed, bounded examples).

Valid draws (shapes, layouts, dtypes, masks, windows, lengths) run on every backend this
machine has for the op and are checked against the fp64 reference with the tolerance rules
of the op's own tests. Invalid draws start from a valid call and break one argument; the op
must raise a ValueError or TypeError whose message starts with that argument's name, before
anything is written (in-place outputs unchanged).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from helpers import assert_close_to_oracle, cu_seqlens_of, reduction_atol, scaled_atol

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import grit_kernels as gk  # noqa: E402
from grit_kernels import _backend  # noqa: E402
from grit_kernels.reference import attention as ref_attn  # noqa: E402
from grit_kernels.reference import attention_kvcache as ref_kv  # noqa: E402
from grit_kernels.reference import contrastive_loss as ref_cl  # noqa: E402
from grit_kernels.reference import mean_pool as ref_mp  # noqa: E402
from grit_kernels.reference import moe as ref_moe  # noqa: E402

SEED = 20261201
# Bounded so that CI stays fast (the Triton interpreter costs ~10-100 ms a launch).
FUZZ = settings(max_examples=int(os.environ.get("GRIT_FUZZ_EXAMPLES", "25")), deadline=None, database=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def backends(op_supported):
    """The backends this machine runs CPU tensors through, for an op that has ``op_supported``."""
    out = ["cpu"]
    if "triton" in op_supported and _backend.has_triton() and _backend.triton_interpret():
        out.append("triton")
    if "cuda" in op_supported and _backend.has_C():
        out.append("cuda")
    return out


def run_on(backend, fn, *args, **kwargs):
    old = os.environ.get("GRIT_BACKEND")
    os.environ["GRIT_BACKEND"] = backend
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["GRIT_BACKEND"]
        else:
            os.environ["GRIT_BACKEND"] = old


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype)


windows = st.tuples(st.integers(-1, 4), st.integers(-1, 4))
scales = st.one_of(st.none(), st.floats(0.05, 2.0))


# ---------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------


@st.composite
def attention_calls(draw):
    """(q, k, v, kwargs) of a valid call, padded or packed."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    Hkv = draw(st.sampled_from([1, 2]))
    Hq = Hkv * draw(st.sampled_from([1, 2]))
    D = draw(st.sampled_from([1, 8, 16, 24]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    kw = dict(causal=draw(st.booleans()), window=draw(windows), softmax_scale=draw(scales))
    if draw(st.booleans()):  # packed
        lens_q = draw(st.lists(st.integers(0, 7), min_size=1, max_size=3))
        same_k = draw(st.booleans())
        lens_k = lens_q if same_k else [draw(st.integers(0, 7)) for _ in lens_q]
        q, k, v = randn(sum(lens_q), Hq, D, dtype=dtype, gen=g), randn(sum(lens_k), Hkv, D, dtype=dtype, gen=g), \
            randn(sum(lens_k), Hkv, D, dtype=dtype, gen=g)
        kw.update(cu_seqlens_q=cu_seqlens_of(lens_q), cu_seqlens_k=cu_seqlens_of(lens_k))
    else:
        B, Sq, Sk = draw(st.integers(1, 2)), draw(st.integers(1, 7)), draw(st.integers(1, 7))
        q, k, v = randn(B, Sq, Hq, D, dtype=dtype, gen=g), randn(B, Sk, Hkv, D, dtype=dtype, gen=g), \
            randn(B, Sk, Hkv, D, dtype=dtype, gen=g)
    return q, k, v, kw


@seed(SEED)
@FUZZ
@given(call=attention_calls())
def test_attention_matches_reference(call):
    q, k, v, kw = call
    ref_kw = {n: kw[n] for n in ("causal", "window", "softmax_scale", "cu_seqlens_q", "cu_seqlens_k") if n in kw}
    hp, _ = ref_attn.attention_ref(q.double(), k.double(), v.double(), **ref_kw)
    lp, _ = ref_attn.attention_ref(q, k, v, upcast=False, **ref_kw)
    for backend in backends(("cpu", "triton")):
        out = run_on(backend, gk.attention, q, k, v, **kw)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert_close_to_oracle(out, hp, lp, atol=1e-5 if q.dtype == torch.float32 else 2e-3, name=backend)


ATTENTION_BREAKS = {
    "q": lambda q, k, v, kw: (q.long(), k, v, kw),
    "k": lambda q, k, v, kw: (q, k.double(), v, kw),
    "v": lambda q, k, v, kw: (q, k, v[..., :1, :, :] if v.dim() == 4 and v.shape[1] > 1 else v[None], kw),
    "causal": lambda q, k, v, kw: (q, k, v, {**kw, "causal": 1}),
    "window": lambda q, k, v, kw: (q, k, v, {**kw, "window": (-2, 0)}),
    "softmax_scale": lambda q, k, v, kw: (q, k, v, {**kw, "softmax_scale": 0.0}),
}


@seed(SEED)
@FUZZ
@given(call=attention_calls(), arg=st.sampled_from(sorted(ATTENTION_BREAKS)))
def test_attention_rejects_a_broken_argument(call, arg):
    q, k, v, kw = ATTENTION_BREAKS[arg](*call)
    for backend in backends(("cpu", "triton")):
        with pytest.raises((ValueError, TypeError), match=f"^{arg}:"):
            run_on(backend, gk.attention, q, k, v, **kw)


# ---------------------------------------------------------------------------------------
# attention_with_kvcache
# ---------------------------------------------------------------------------------------


@st.composite
def kvcache_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B, Sq, S_max = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(3, 12))
    Hkv = draw(st.sampled_from([1, 2]))
    Hq, D = Hkv * draw(st.sampled_from([1, 2])), draw(st.sampled_from([8, 16]))
    append = draw(st.booleans())
    room = S_max - (Sq if append else 0)
    lengths = [draw(st.integers(0, room)) for _ in range(B)]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    # NaN past what each row holds after the append: a read there would show.
    kc, vc = torch.full((B, S_max, Hkv, D), float("nan")), torch.full((B, S_max, Hkv, D), float("nan"))
    for b, n in enumerate(lengths):
        kc[b, :n], vc[b, :n] = randn(n, Hkv, D, gen=g), randn(n, Hkv, D, gen=g)
    k = v = None
    if append:
        k, v = randn(B, Sq, Hkv, D, gen=g), randn(B, Sq, Hkv, D, gen=g)
    kw = dict(causal=draw(st.booleans()), window=draw(windows), softmax_scale=draw(scales))
    return randn(B, Sq, Hq, D, gen=g), kc, vc, seqlens, k, v, kw


@seed(SEED)
@FUZZ
@given(call=kvcache_calls())
def test_attention_with_kvcache_matches_reference(call):
    q, kc, vc, seqlens, k, v, kw = call
    want_kc, want_vc = kc.clone(), vc.clone()
    if k is not None:
        ref_kv.append_kv(want_kc, want_vc, seqlens, k, v)
    seen = (seqlens + (q.shape[1] if k is not None else 0)).tolist()
    hp, _ = ref_attn.attention_ref(q.double(), want_kc.double(), want_vc.double(), seqlens_k=seen, **kw)
    lp, _ = ref_attn.attention_ref(q, want_kc, want_vc, seqlens_k=seen, **kw)
    for backend in backends(("cpu", "triton")):
        kc1, vc1 = kc.clone(), vc.clone()
        out = run_on(backend, gk.attention_with_kvcache, q, kc1, vc1, seqlens, k, v, **kw)
        assert torch.isfinite(out).all(), f"{backend}: read past a row's length"
        assert torch.equal(kc1.nan_to_num(7.0), want_kc.nan_to_num(7.0)), f"{backend}: wrong cache writes"
        assert torch.equal(vc1.nan_to_num(7.0), want_vc.nan_to_num(7.0)), f"{backend}: wrong cache writes"
        assert_close_to_oracle(out, hp, lp, atol=1e-5, name=backend)


KVCACHE_BREAKS = {
    "q": lambda a: {**a, "q": a["q"].double()},
    "k_cache": lambda a: {**a, "k_cache": a["k_cache"].half()},
    "v_cache": lambda a: {**a, "v_cache": a["v_cache"][:, :-1]},
    "cache_seqlens": lambda a: {**a, "cache_seqlens": a["cache_seqlens"] + a["k_cache"].shape[1] + 1},
    "k": lambda a: {**a, "k": a["v"][..., :-1] if a["v"] is not None else a["q"][:, :, :1]},
    "causal": lambda a: {**a, "causal": "yes"},
    "window": lambda a: {**a, "window": (1.5, 0)},
    "softmax_scale": lambda a: {**a, "softmax_scale": -1.0},
}


@seed(SEED)
@FUZZ
@given(call=kvcache_calls(), arg=st.sampled_from(sorted(KVCACHE_BREAKS)))
def test_attention_with_kvcache_rejects_a_broken_argument(call, arg):
    q, kc, vc, seqlens, k, v, kw = call
    a = KVCACHE_BREAKS[arg](dict(q=q, k_cache=kc, v_cache=vc, cache_seqlens=seqlens, k=k, v=v, **kw))
    if arg == "k" and v is None:
        a["v"] = None  # k without v: the error names the missing one
        arg = "v"
    before = (a["k_cache"].clone(), a["v_cache"].clone())
    for backend in backends(("cpu", "triton")):
        with pytest.raises((ValueError, TypeError), match=f"^{arg}:"):
            run_on(backend, gk.attention_with_kvcache, **a)
        assert torch.equal(a["k_cache"].nan_to_num(7.0), before[0].nan_to_num(7.0)), "a rejected call wrote k_cache"
        assert torch.equal(a["v_cache"].nan_to_num(7.0), before[1].nan_to_num(7.0)), "a rejected call wrote v_cache"


# ---------------------------------------------------------------------------------------
# mean_pool
# ---------------------------------------------------------------------------------------


@st.composite
def mean_pool_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    D = draw(st.sampled_from([1, 3, 16, 33]))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    kw = dict(normalize=draw(st.booleans()), weighted=draw(st.booleans()))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 9), min_size=1, max_size=4))
        skips = [draw(st.integers(0, 10)) for _ in lengths]
        h = randn(sum(lengths), D, dtype=dtype, gen=g)
        return h, None, dict(cu_seqlens=cu_seqlens_of(lengths), skip=torch.tensor(skips, dtype=torch.int32), **kw)
    B, S = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    mask = torch.rand(B, S, generator=g) < draw(st.floats(0.0, 1.0))
    return randn(B, S, D, dtype=dtype, gen=g), mask, kw


@seed(SEED)
@FUZZ
@given(call=mean_pool_calls())
def test_mean_pool_matches_reference(call):
    h, mask, kw = call
    if mask is None:
        want = ref_mp.mean_pool_packed(h, kw["cu_seqlens"], kw["skip"], normalize=kw["normalize"],
                                       weighted=kw["weighted"], dtype=torch.float64)
        n = h.shape[0]
    else:
        want = ref_mp.mean_pool_padded(h, mask, dtype=torch.float64, **kw)
        n = h.shape[1]
    for backend in backends(("cpu", "triton", "cuda")):
        out = run_on(backend, gk.mean_pool, h, mask, **kw)
        assert out.dtype == torch.float32
        # fp32 sums of exactly representable inputs: the n-term bound (weights up to n for
        # weightedmean, the norm's D terms)
        torch.testing.assert_close(out.double(), want, rtol=0,
                                   atol=reduction_atol(want, torch.float32, 2 * n + h.shape[-1]))


MEAN_POOL_BREAKS = {
    "hidden": lambda h, m, kw: (h.long(), m, kw),
    "mask": lambda h, m, kw: (h, (m[:, :-1] if m is not None else torch.ones(1, 1)), kw),
    "cu_seqlens": lambda h, m, kw: (h if m is None else h[0], None,
                                    {**{k: v for k, v in kw.items() if k != "skip"},
                                     "cu_seqlens": torch.tensor([1, h.shape[0] + 1], dtype=torch.int32)}),
    "skip": lambda h, m, kw: (h, m, {**kw, "skip": torch.zeros(7, dtype=torch.int32)}),
}


@seed(SEED)
@FUZZ
@given(call=mean_pool_calls(), arg=st.sampled_from(sorted(MEAN_POOL_BREAKS)))
def test_mean_pool_rejects_a_broken_argument(call, arg):
    h, m, kw = MEAN_POOL_BREAKS[arg](*call)
    for backend in backends(("cpu", "triton", "cuda")):
        with pytest.raises((ValueError, TypeError), match=f"^{arg}:"):
            run_on(backend, gk.mean_pool, h, m, **kw)


# ---------------------------------------------------------------------------------------
# contrastive_loss
# ---------------------------------------------------------------------------------------


@st.composite
def contrastive_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    B, group, D = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 5, 16, 17]))
    kw = dict(temperature=draw(st.sampled_from([0.02, 0.1, 1.0])), normalize=draw(st.booleans()),
              reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if draw(st.booleans()):
        kw["targets"] = torch.randint(0, B * group, (B,), generator=g)
    return randn(B, D, gen=g), randn(B * group, D, gen=g), kw


@seed(SEED)
@FUZZ
@given(call=contrastive_calls())
def test_contrastive_loss_matches_reference(call):
    q, d, kw = call
    targets = kw.get("targets")
    args = dict(temperature=kw["temperature"], normalize=kw["normalize"], reduction=kw["reduction"])
    hp = ref_cl.contrastive_loss(q.double(), d.double(), targets, dtype=torch.float64, **args)
    lp = ref_cl.contrastive_loss(q, d, targets, **args)
    logit_scale = 1.0 / kw["temperature"] * (1.0 if kw["normalize"] else float(q.norm(dim=1).max() *
                                                                              d.norm(dim=1).max()))
    for backend in backends(("cpu", "triton")):
        loss = run_on(backend, gk.contrastive_loss, q, d, **kw)
        assert loss.dtype == torch.float32
        # the logits' rounding is at their own magnitude, not the loss's
        atol = reduction_atol(torch.tensor(logit_scale), torch.float32, q.shape[1] + d.shape[0], k=4)
        assert_close_to_oracle(loss, hp, lp, atol=atol + scaled_atol(hp, torch.float32), name=backend)


CONTRASTIVE_BREAKS = {
    "q": lambda q, d, kw: (q[0], d, kw),
    "d": lambda q, d, kw: (q, d[:, :0] if d.shape[1] > 1 else d.half(), kw),
    "temperature": lambda q, d, kw: (q, d, {**kw, "temperature": float("nan")}),
    "targets": lambda q, d, kw: (q, d, {**kw, "targets": torch.full((q.shape[0],), d.shape[0])}),
    "reduction": lambda q, d, kw: (q, d, {**kw, "reduction": "avg"}),
    "normalize": lambda q, d, kw: (q, d, {**kw, "normalize": "yes"}),
}


@seed(SEED)
@FUZZ
@given(call=contrastive_calls(), arg=st.sampled_from(sorted(CONTRASTIVE_BREAKS)))
def test_contrastive_loss_rejects_a_broken_argument(call, arg):
    q, d, kw = CONTRASTIVE_BREAKS[arg](*call)
    for backend in backends(("cpu", "triton")):
        with pytest.raises((ValueError, TypeError), match=f"^{arg}:"):
            run_on(backend, gk.contrastive_loss, q, d, **kw)


# ---------------------------------------------------------------------------------------
# moe_route, moe_experts
# ---------------------------------------------------------------------------------------


@st.composite
def moe_calls(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    T, E = draw(st.integers(1, 9)), draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    D, F = draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 48]))
    logits = randn(T, E, gen=g)
    x = randn(T, D, gen=g)
    w1, w3, w2 = (0.3 * randn(E, F, D, gen=g), 0.3 * randn(E, F, D, gen=g), 0.3 * randn(E, D, F, gen=g))
    return logits, K, x, w1, w2, w3


@seed(SEED)
@FUZZ
@given(call=moe_calls())
def test_moe_matches_reference(call):
    logits, K, x, w1, w2, w3 = call
    want_w, want_e = ref_moe.route(logits, K)
    for backend in backends(("cpu", "triton", "cuda")):
        weights, experts = run_on(backend, gk.moe_route, logits, top_k=K)
        top = torch.sort(torch.softmax(logits, -1), -1, descending=True).values
        distinct = (top[:, :-1] != top[:, 1:]).all() if top.shape[1] > 1 else True
        if distinct:  # exact ties may resolve either way within one rounding
            assert torch.equal(experts.long(), want_e.long()), backend
        torch.testing.assert_close(weights, want_w, rtol=torch.finfo(torch.float32).eps,
                                   atol=reduction_atol(want_w, torch.float32, logits.shape[1] + K))
        hp = ref_moe.experts_forward(x.double(), w1.double(), w2.double(), w3.double(), want_w.double(), want_e)
        lp = ref_moe.experts_forward(x, w1, w2, w3, want_w, want_e)
        out = run_on(backend, gk.moe_experts, x, w1, w2, w3, want_w, want_e)
        assert_close_to_oracle(out, hp, lp, atol=scaled_atol(hp, torch.float32, 64), factor=3.0, name=backend)


MOE_BREAKS = {
    "x": lambda a: {**a, "x": a["x"].long()},
    "w1": lambda a: {**a, "w1": a["w1"].half()},
    "w2": lambda a: {**a, "w2": a["w2"][..., :-1]},
    "experts": lambda a: {**a, "experts": a["experts"] + a["w1"].shape[0]},
    "weights": lambda a: {**a, "weights": a["weights"][:, :0]},
}


@seed(SEED)
@FUZZ
@given(call=moe_calls(), arg=st.sampled_from(sorted(MOE_BREAKS) + ["top_k", "router_logits"]))
def test_moe_rejects_a_broken_argument(call, arg):
    logits, K, x, w1, w2, w3 = call
    weights, experts = ref_moe.route(logits, K)
    for backend in backends(("cpu", "triton", "cuda")):
        if arg == "top_k":
            with pytest.raises((ValueError, TypeError), match="^top_k:"):
                run_on(backend, gk.moe_route, logits, top_k=logits.shape[1] + 1)
            continue
        if arg == "router_logits":
            with pytest.raises((ValueError, TypeError), match="^router_logits:"):
                run_on(backend, gk.moe_route, logits.long(), top_k=K)
            continue
        a = MOE_BREAKS[arg](dict(x=x, w1=w1, w2=w2, w3=w3, weights=weights, experts=experts))
        with pytest.raises((ValueError, TypeError), match=f"^{arg}:"):
            run_on(backend, gk.moe_experts, **a)


def test_every_public_op_is_fuzzed():
    """A new public op must get a property test here too."""
    fuzzed = {"attention", "attention_with_kvcache", "mean_pool", "contrastive_loss", "moe_route", "moe_experts"}
    not_ops = {"GradCache", "moe_aux_loss"}  # a training helper; a plain-PyTorch formula with its own tests
    assert set(gk.__all__) - not_ops == fuzzed
    assert math.isfinite(SEED)
