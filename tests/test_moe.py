"""Mixtral MoE (moe_route, moe_experts, moe_aux_loss) vs transformers and the reference.

CPU: torch (reference), cuda (csrc's host build of routing / sort / combine, with the Triton
GEMMs under the interpreter) and triton (interpreter). The expert outputs are checked against
transformers' MixtralSparseMoeBlock loaded with the same weights; gradients of every input
against autograd through the plain-PyTorch loop in fp64. GPU-marked: the CUDA kernels and the
Triton kernels compiled for the device, bf16 included.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_oracle, compile_for_sm90, reduction_atol

import grit_kernels
from grit_kernels import moe_aux_loss, moe_experts, moe_route
from grit_kernels import _backend
from grit_kernels.cuda import moe as cuda_moe
from grit_kernels.reference import moe as ref

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig  # noqa: E402
from transformers.models.mixtral import modeling_mixtral as hf  # noqa: E402

needs_C = pytest.mark.skipif(not _backend.has_C(), reason="grit_kernels._C not built")
KERNEL_BACKENDS = ["triton", pytest.param("cuda", marks=needs_C)]
ALL_BACKENDS = ["cpu", *KERNEL_BACKENDS]


@pytest.fixture(autouse=True)
def _single_thread():
    """The shapes here are tiny: intra-op threads only add hand-offs, and on a busy machine
    OpenMP's spinning made one 64-token expert loop take 2 s instead of 2 ms (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hf_block(D, F, E, K, dtype=torch.float32, seed=0):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                        router_jitter_noise=0.0)
    cfg._experts_implementation = "eager"  # the per-expert Python loop
    torch.manual_seed(seed)
    block = hf.MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block.to(dtype)


def block_weights(block, F):
    """(router weight (E, D), w1, w2, w3) from HF's fused layout."""
    gate_up = block.experts.gate_up_proj.detach()
    return (block.gate.weight.detach(), gate_up[:, :F].contiguous(), block.experts.down_proj.detach().contiguous(),
            gate_up[:, F:].contiguous())


def hf_route(logits, K):
    """MixtralTopKRouter's arithmetic, cast back like the contract."""
    probs = torch.softmax(logits.float(), dim=-1)
    top, idx = torch.topk(probs, K, dim=-1)
    return (top / top.sum(dim=-1, keepdim=True)).to(logits.dtype), idx


def assert_weights_close(weights, want_w, E: int):
    """Routing weights: an fp32 softmax over E logits and a top-k renormalisation, summed in
    another order than the reference (E-term bound at their magnitude), then rounded to the
    logits' dtype, where one unit of that dtype may separate the two."""
    w, want = weights.float(), want_w.float()
    torch.testing.assert_close(w, want, rtol=torch.finfo(weights.dtype).eps,
                               atol=reduction_atol(want, torch.float32, E + 8))


def random_experts(T, D, F, E, dtype=torch.float32, scale=0.3):
    x = torch.randn(T, D).to(dtype)
    w1, w3 = (torch.randn(E, F, D) * scale).to(dtype), (torch.randn(E, F, D) * scale).to(dtype)
    w2 = (torch.randn(E, D, F) * scale).to(dtype)
    return x, w1, w2, w3


# ---------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=needs_C)], indirect=True)
@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (16, 4), (64, 8), (128, 2)])  # E > 64: torch-ops fallback
@pytest.mark.parametrize("T", [1, 3, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_route_matches_transformers(backend, E, K, T, dtype):
    logits = torch.randn(T, E).to(dtype)
    weights, experts = moe_route(logits, top_k=K)
    want_w, want_e = hf_route(logits, K)
    assert weights.dtype == dtype and experts.dtype == torch.int32 and weights.shape == (T, K)
    # Low-precision logits tie often (torch.topk's order among ties is its own): compare the
    # chosen probabilities everywhere and the ids on rows without duplicate values.
    probs = torch.softmax(logits.float(), dim=-1)
    torch.testing.assert_close(probs.gather(1, experts.long()), probs.gather(1, want_e), rtol=0, atol=0)
    top = torch.sort(probs, dim=-1, descending=True).values[:, : K + 1]
    distinct = torch.tensor([row.unique().numel() == row.numel() for row in top])  # no tie in the top K + 1
    assert distinct.any()
    assert torch.equal(experts.long()[distinct], want_e[distinct])
    # fp32 ulps in exp may flip a rounding to the low dtype: one ulp of it is allowed.
    assert_weights_close(weights, want_w, logits.shape[-1])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=needs_C)], indirect=True)
def test_route_ties_lowest_index_first(backend):
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0, 1.0, 0.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    weights, experts = moe_route(logits, top_k=3)
    assert experts.tolist() == [[1, 2, 3], [0, 1, 2], [3, 0, 1]]
    # Whatever order torch.topk picks among ties, the chosen probabilities are the same.
    want_w, _ = hf_route(logits, 3)
    torch.testing.assert_close(weights, want_w)


@needs_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_route_host_build_vs_reference(dtype, monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "cuda")
    # Integer-valued logits: many exact ties, across the whole E = 64, K = 8 range.
    logits = torch.randint(-3, 3, (97, 64)).to(dtype)
    weights, experts = moe_route(logits, top_k=8)
    want_w, want_e = ref.route(logits, 8)
    assert torch.equal(experts, want_e)
    assert_weights_close(weights, want_w, logits.shape[-1])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=needs_C)], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_route_backward(backend, dtype):
    logits = torch.randn(9, 8).to(dtype).requires_grad_()
    weights, experts = moe_route(logits, top_k=2)
    g = torch.randn(9, 2)
    (weights.float() * g).sum().backward()
    # transformers' arithmetic in fp64 on the same choice of experts
    l64 = logits.detach().double().requires_grad_()
    p = torch.softmax(l64, dim=-1).gather(1, experts.long())
    ((p / p.sum(dim=-1, keepdim=True)) * g.double()).sum().backward()
    # fp32 softmax over E = 8 logits and a K = 2 renormalisation: an (E + K)-term bound at the
    # gradient's magnitude; fp16 inputs add one rounding of the logits (eps relative).
    E = logits.shape[-1]
    tol = dict(rtol=0 if dtype == torch.float32 else 8 * torch.finfo(dtype).eps,
               atol=reduction_atol(l64.grad, torch.float32, E + 2, k=4))
    torch.testing.assert_close(logits.grad.double(), l64.grad, **tol)


# ---------------------------------------------------------------------------------------
# csrc sort / combine (host build) vs the reference
# ---------------------------------------------------------------------------------------


def _routings(T, K, E):
    gen = torch.Generator().manual_seed(1)
    yield "random", torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(torch.int32)
    same = torch.arange(K, dtype=torch.int32).repeat(T, 1)  # every token picks experts 0..K-1
    yield "same", same
    yield "few_experts", torch.randint(0, max(K, 2), (T, K), generator=gen, dtype=torch.int32) % E
    bad = torch.randint(0, E, (T, K), generator=gen, dtype=torch.int32)
    bad[0, 0], bad[-1, -1] = -1, E  # out of range: left out
    yield "out_of_range", bad


@needs_C
@pytest.mark.parametrize("T,K,E", [(1, 2, 8), (3, 1, 4), (257, 4, 16), (1000, 2, 256)])
@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_sort_host_build_vs_reference(T, K, E, block_m):
    for name, experts in _routings(T, K, E):
        got = cuda_moe.sort(experts.reshape(-1).contiguous(), E, block_m)
        want = ref.sort_align(experts, E, block_m)
        for what, a, b in zip(("sorted_ids", "tile_expert", "offsets"), got, want):
            assert torch.equal(a, b), f"{name}: {what} differs"
        # The layout itself: every valid slot once, in its expert's tiles.
        sorted_ids, tile_expert, offsets = want
        valid = (experts >= 0) & (experts < E)
        placed = sorted_ids[sorted_ids < T * K]
        assert sorted(placed.tolist()) == valid.reshape(-1).nonzero().flatten().tolist()
        rows = (sorted_ids < T * K).nonzero().flatten()
        assert torch.equal(tile_expert[rows // block_m].long(), experts.reshape(-1)[sorted_ids[rows].long()].long())
        assert int(offsets[-1]) % block_m == 0


@needs_C
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_combine_host_build_vs_reference(dtype):
    T, K, D, E = 37, 3, 45, 4
    y = torch.randn(T * K, D)
    experts = torch.randint(-1, E + 1, (T, K), dtype=torch.int32)
    w = torch.rand(T * K)
    for weights in (w, None):
        got = cuda_moe.combine_weighted(y, weights, experts, E, K, dtype)
        want = ref.combine(y, K, weights, experts, E, dtype)
        assert got.dtype == dtype
        # K fp32 adds in another order at most, then rounded to dtype (one unit of it)
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps,
                                   atol=reduction_atol(want.float(), torch.float32, K))
    # Same fixed order of the K adds: bitwise equal in fp32.
    assert torch.equal(cuda_moe.combine_weighted(y, None, None, E, K, torch.float32), ref.combine(y, K))


# ---------------------------------------------------------------------------------------
# experts: forward vs transformers, gradients vs the reference
# ---------------------------------------------------------------------------------------

FWD_SHAPES = [  # (T, D, F, E, K): T = 1, 3, 257 for each (E, K) of Mixtral-like routings
    (1, 32, 64, 8, 2),
    (3, 32, 64, 8, 2),
    (257, 32, 64, 8, 2),
    (1, 48, 96, 4, 1),
    (3, 48, 96, 4, 1),
    (257, 64, 64, 4, 1),
    (1, 32, 64, 16, 4),
    (3, 32, 64, 16, 4),
    (257, 32, 96, 16, 4),
]
# The interpreter runs the five backward GEMMs slowly: a subset, odd sizes kept.
GRAD_SHAPES = [(1, 32, 64, 8, 2), (257, 32, 64, 8, 2), (3, 48, 96, 4, 1), (3, 32, 64, 16, 4)]


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("T,D,F,E,K", FWD_SHAPES)
def test_forward_matches_transformers_block(backend, T, D, F, E, K):
    block = hf_block(D, F, E, K)
    x = torch.randn(1, T, D)
    with torch.no_grad():
        want = block(x).reshape(T, D)
    gate, w1, w2, w3 = block_weights(block, F)
    x_TD = x.reshape(T, D)
    weights, experts = moe_route(x_TD @ gate.t(), top_k=K)
    out = moe_experts(x_TD, w1, w2, w3, weights, experts)
    assert out.shape == (T, D) and out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _check_grads(x, w1, w2, w3, weights, experts, *, factor=2.0):
    """Kernel gradients vs fp64 autograd through the reference loop, flash-attn's rule."""
    leaves = [t.clone().requires_grad_() for t in (x, w1, w2, w3, weights)]
    out = moe_experts(*leaves, experts)
    g = torch.randn(out.shape).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, g)

    def oracle(dtype):
        ls = [t.detach().to(dtype).requires_grad_() for t in (x, w1, w2, w3, weights)]
        o = ref.experts_forward(*ls, experts)
        return o, torch.autograd.grad(o, ls, g.to(dtype))

    hp_out, hp = oracle(torch.float64)
    lp_out, lp = oracle(x.dtype)
    scale = hp_out.abs().max().item() + 1e-30
    assert_close_to_oracle(out, hp_out, lp_out, atol=1e-6 * scale, factor=factor, name="out")
    for name, got, h, l in zip(("dx", "dw1", "dw2", "dw3", "dweights"), grads, hp, lp):
        assert got.dtype == l.dtype and got.shape == l.shape, name
        assert_close_to_oracle(got, h, l, atol=1e-6 * (h.abs().max().item() + 1e-30), factor=factor, name=name)


@pytest.mark.parametrize(
    "backend,T,D,F,E,K",
    # the torch backend's hand-written backward needs no large T to be exercised
    [pytest.param(b, *shape, marks=[needs_C] if b == "cuda" else [], id="-".join(map(str, (b, *shape))))
     for b in ("cpu", "triton", "cuda") for shape in GRAD_SHAPES if not (b == "cpu" and shape[0] > 100)],
    indirect=["backend"],
)
def test_gradients_vs_reference(backend, T, D, F, E, K):
    x, w1, w2, w3 = random_experts(T, D, F, E)
    weights, experts = ref.route(torch.randn(T, E), K)
    _check_grads(x, w1, w2, w3, weights, experts)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_gradients_fp16(backend):
    T, D, F, E, K = 37, 32, 64, 8, 2
    x, w1, w2, w3 = random_experts(T, D, F, E, torch.float16)
    weights, experts = ref.route(torch.randn(T, E).half(), K)
    _check_grads(x, w1, w2, w3, weights, experts, factor=3.0)



@pytest.mark.parametrize("backend", ["triton"], indirect=True)
@pytest.mark.parametrize("T,E,K,dtype", [(1, 8, 2, torch.float16), (80, 4, 1, torch.float16),
                                         (70, 2, 2, torch.float32), (150, 2, 2, torch.float16)])
def test_gpu_tile_configs_under_interpreter(backend, T, E, K, dtype, monkeypatch):
    """The planner's GPU tile sizes (BM 16, 32, 64, 128 as rows per expert grow), run by the
    interpreter with dims that are not multiples of the tiles, so every mask is exercised."""
    from grit_kernels.triton import moe as tri

    real_plan = tri.plan
    monkeypatch.setattr(tri, "plan", lambda TK, E, D, F, dt, on_gpu: real_plan(TK, E, D, F, dt, True))
    bm = real_plan(T * K, E, 40, 72, dtype, True).block_m
    assert bm == {1: 16, 80: 32, 70: 64, 150: 128}[T]
    x, w1, w2, w3 = random_experts(T, 40, 72, E, dtype)
    weights, experts = ref.route(torch.randn(T, E).to(dtype), K)
    _check_grads(x, w1, w2, w3, weights, experts, factor=3.0)

@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
@pytest.mark.parametrize("routing", ["all_same_expert", "empty_experts"])
def test_degenerate_routing(backend, routing):
    T, D, F, E, K = 40, 32, 64, 8, 2
    x, w1, w2, w3 = random_experts(T, D, F, E)
    if routing == "all_same_expert":  # one expert's block spans several tiles; the others are empty
        experts = torch.tensor([[5, 2]], dtype=torch.int32).repeat(T, 1)
    else:  # experts 0, 3, 4, 6, 7 get no token
        experts = torch.tensor([[1, 2], [2, 5], [5, 1]], dtype=torch.int32).repeat(T // 3 + 1, 1)[:T]
    weights = torch.softmax(torch.randn(T, K), dim=-1)
    _check_grads(x, w1, w2, w3, weights, experts)
    leaves = [w.clone().requires_grad_() for w in (w1, w2, w3)]
    moe_experts(x, *leaves[:1], leaves[1], leaves[2], weights, experts).sum().backward()
    unused = sorted(set(range(E)) - set(experts.flatten().tolist()))
    for leaf in leaves:  # experts without tokens get exact zeros, never garbage
        assert torch.equal(leaf.grad[unused], torch.zeros_like(leaf.grad[unused]))


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_router_trains_end_to_end(backend):
    """Gradient reaches the router logits through moe_route's weights, as in transformers."""
    T, D, F, E, K = 5, 32, 64, 8, 2
    block = hf_block(D, F, E, K)
    gate, w1, w2, w3 = block_weights(block, F)
    x = torch.randn(T, D)
    g_param = gate.clone().requires_grad_()
    weights, experts = moe_route(x @ g_param.t(), top_k=K)
    (moe_experts(x, w1, w2, w3, weights, experts) ** 2).sum().backward()
    block.zero_grad()
    (block(x[None]) ** 2).sum().backward()
    want = block.gate.weight.grad
    # HF's gradient reaches the unchosen logits through the full softmax's normaliser, where it
    # cancels only up to rounding: compare with an atol relative to the gradient's size.
    torch.testing.assert_close(g_param.grad, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


# ---------------------------------------------------------------------------------------
# aux loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("E,K", [(8, 2), (4, 1), (16, 4)])
def test_aux_loss_matches_transformers(E, K):
    B, S, L = 3, 5, 4
    layers = tuple(torch.randn(B * S, E) for _ in range(L))
    want = hf.load_balancing_loss_func(layers, E, K)
    torch.testing.assert_close(moe_aux_loss(layers, K), want)
    torch.testing.assert_close(moe_aux_loss(torch.cat(layers), K), want)  # (L*T, E) concatenated
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, 3:] = 0
    mask[2, :1] = 0
    want_m = hf.load_balancing_loss_func(layers, E, K, attention_mask=mask)
    torch.testing.assert_close(moe_aux_loss(layers, K, mask), want_m)
    torch.testing.assert_close(moe_aux_loss(torch.cat(layers), K, mask), want_m)
    logits = torch.randn(B * S, E, requires_grad=True)  # differentiable through the probabilities
    moe_aux_loss((logits,), K).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


def _good(T=3, D=16, F=32, E=4, K=2):
    x, w1, w2, w3 = random_experts(T, D, F, E)
    weights, experts = ref.route(torch.randn(T, E), K)
    return dict(x=x, w1=w1, w2=w2, w3=w3, weights=weights, experts=experts)


@pytest.mark.parametrize(
    "change,err,name",
    [
        (dict(x=torch.randn(3, 17)), ValueError, "w1"),
        (dict(x=torch.randn(1, 3, 16)), ValueError, "x"),
        (dict(x=torch.randn(3, 16).half()), TypeError, "w1"),
        (dict(w1=torch.randn(4, 32, 15)), ValueError, "w1"),
        (dict(w3=torch.randn(5, 32, 16)), ValueError, "w3"),
        (dict(w3=torch.randn(4, 31, 16)), ValueError, "w3"),
        (dict(w2=torch.randn(4, 32, 16)), ValueError, "w2"),
        (dict(w2=torch.randn(3, 16, 32)), ValueError, "w2"),
        (dict(weights=torch.rand(3, 3)), ValueError, "weights"),
        (dict(weights=torch.rand(3, 2).to(torch.int32)), TypeError, "weights"),
        (dict(experts=torch.tensor([[0, 1], [2, 4], [0, 1]], dtype=torch.int32)), ValueError, "experts"),
        (dict(experts=torch.tensor([[0, 1], [2, -1], [0, 1]], dtype=torch.int32)), ValueError, "experts"),
        (dict(experts=torch.zeros(3, 2)), TypeError, "experts"),
        (dict(experts=torch.zeros(3, 5, dtype=torch.int32), weights=torch.rand(3, 5)), ValueError, "experts"),
        (dict(experts=torch.zeros(2, 2, dtype=torch.int32)), ValueError, "experts"),
        (dict(w2=torch.empty(4, 16, 32, device="meta")), ValueError, "w2"),  # another device
        (dict(weights=torch.empty(3, 2, device="meta")), ValueError, "weights"),
    ],
)
def test_experts_bad_input(change, err, name):
    args = _good()
    args.update(change)
    with pytest.raises(err, match=name):
        moe_experts(args["x"], args["w1"], args["w2"], args["w3"], args["weights"], args["experts"])


def test_route_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(3, 4), top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(torch.randn(3, 4), top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        moe_route(torch.randn(3, 4), top_k=2.0)
    with pytest.raises(ValueError, match="router_logits"):
        moe_route(torch.randn(2, 3, 4), top_k=2)
    with pytest.raises(ValueError, match="router_logits"):
        moe_route(torch.randn(4), top_k=2)
    with pytest.raises(TypeError, match="router_logits"):
        moe_route(torch.randint(0, 3, (3, 4)), top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        moe_aux_loss((torch.randn(6, 4),), top_k=5)
    with pytest.raises(ValueError, match="router_logits"):
        moe_aux_loss((torch.randn(6, 4), torch.randn(6, 5)), top_k=2)
    with pytest.raises(ValueError, match="mask"):
        moe_aux_loss((torch.randn(6, 4),), top_k=2, mask=torch.ones(2, 4))


# ---------------------------------------------------------------------------------------
# torch.library
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)
def test_opcheck(backend):
    a = _good(T=5, D=16, F=32, E=4, K=2)
    for key in ("x", "w1", "w2", "w3", "weights"):
        a[key] = a[key].requires_grad_()
    torch.library.opcheck(torch.ops.grit.moe_experts.default,
                          (a["x"], a["w1"], a["w2"], a["w3"], a["weights"], a["experts"], True))
    torch.library.opcheck(torch.ops.grit.moe_route.default, (torch.randn(5, 8, requires_grad=True), 2))


@pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)
def test_compile_fullgraph(backend):
    a = _good(T=5, D=16, F=32, E=4, K=2)
    gate = torch.randn(4, 16)

    def layer(x):
        w, e = moe_route(x @ gate.t(), top_k=2)
        return moe_experts(x, a["w1"], a["w2"], a["w3"], w, e)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(a["x"]), layer(a["x"]))


def test_public_names():
    assert grit_kernels.moe_route is moe_route and grit_kernels.moe_experts is moe_experts


# ---------------------------------------------------------------------------------------
# compiled for sm_90 without a GPU: what the interpreter lets through (non-constexpr
# globals, dot shapes and layouts, the tile sizes only GPU plans choose)
# ---------------------------------------------------------------------------------------

# Every kernel built as the launchers of grit_kernels/triton/moe.py launch it for Mixtral
# (E 8, top-2, D 4096, F 14336): tiles, num_warps and num_stages from plan(on_gpu=True) for a
# decode step and for each BM bucket, and the JIT's specialisation of the argument values
# (pointers 16-byte aligned, ints divisible by 16 marked so, ints equal to 1 constexpr).
_AOT_SCRIPT = r"""
import torch
from grit_kernels.triton import moe as m
from grit_kernels._shared import max_tiles

def experts(dt, T, save, E=8, K=2, D=4096, F=14336):
    TK = T * K
    cfg = m.plan(TK, E, D, F, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dt]), True)
    n_tiles = max_tiles(TK, E, cfg.block_m)
    p, i32, f32 = "*" + dt, "*i32", "*fp32"  # routing weights in the activations' dtype
    rows = dict(sorted_ptr=i32, tile_expert_ptr=i32, TK=TK, D=D, F=F, n_tiles=n_tiles)
    tiles = dict(PREC="ieee" if cfg.ieee else "tf32", BM=cfg.block_m, BK=cfg.block_k, GROUP_M=cfg.group_m)
    opts = (cfg.num_warps, cfg.num_stages)
    compile_launch(m._gate_up_kernel, dict(x_ptr=p, w1_ptr=p, w3_ptr=p, gu_ptr=p, h_ptr=p, **rows),
                   dict(K_TOP=K, SAVE=save, BN=cfg.block_n, **tiles), *opts)
    compile_launch(m._down_kernel, dict(h_ptr=p, w2_ptr=p, rw_ptr=p, y_ptr=f32, **rows),
                   dict(BN=cfg.block_n_down, **tiles), *opts)
    if not save:  # inference: no backward
        return
    compile_launch(m._down_bwd_kernel, dict(dout_ptr=p, w2_ptr=p, gu_ptr=p, rw_ptr=p, dgu_ptr=p, dwp_ptr=f32,
                                            M=n_tiles * cfg.block_m, **rows),
                   dict(K_TOP=K, BN=cfg.block_n, **tiles), *opts)
    compile_launch(m._dx_kernel, dict(dgu_ptr=p, w1_ptr=p, w3_ptr=p, dxs_ptr=f32, **rows),
                   dict(BN=cfg.block_n, **tiles), *opts)
    dw = dict(K_TOP=K, PREC="ieee" if cfg.ieee else "tf32", BI=cfg.block_dw, BJ=cfg.block_dw, BR=cfg.block_r, GROUP_M=cfg.group_m)
    compile_launch(m._dw_kernel, dict(a_ptr=p, b_ptr=p, sorted_ptr=i32, offsets_ptr=i32, rw_ptr=p, out_ptr=p,  # dw3
                                      TK=TK, I=F, J=D, a_stride=2 * F, b_stride=D, a_col0=F),
                   dict(A_GATHER=False, B_GATHER=True, A_SCALE=False, **dw), *opts)
    compile_launch(m._dw_kernel, dict(a_ptr=p, b_ptr=p, sorted_ptr=i32, offsets_ptr=i32, rw_ptr=p, out_ptr=p,  # dw2
                                      TK=TK, I=D, J=F, a_stride=D, b_stride=F, a_col0=0),
                   dict(A_GATHER=True, B_GATHER=False, A_SCALE=True, **dw), *opts)

# bf16: decode (T = 1, BM 16, forward only), then training steps in each BM bucket
# (16, 32, 64, 128 rows per tile); fp32: its own plans (ieee dots, narrower tiles).
for dt, T, save in [("bf16", 1, False), ("bf16", 1, True), ("bf16", 128, True), ("bf16", 256, True),
                    ("bf16", 8192, True), ("fp32", 1, True), ("fp32", 4096, True)]:
    experts(dt, T, save)
"""


def test_kernels_compile_for_sm90():
    """gate/up, down and the backward kernels, compiled ahead of time for H100."""
    from grit_kernels.triton import moe as tri

    # the cases above cover every BM bucket of the planner
    assert {tri.plan(T * 2, 8, 4096, 14336, torch.bfloat16, True).block_m for T in (1, 128, 256, 8192)} == {
        16, 32, 64, 128}
    compile_for_sm90(_AOT_SCRIPT, "moe")


# ---------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_C)], indirect=True)
@pytest.mark.parametrize(
    "dtype,T,D,F,E,K",
    [  # one shape per tile height the planner picks (BM 16, 128, 64); every config compiles ~6 kernels
        (torch.bfloat16, 1, 256, 512, 8, 2),
        (torch.bfloat16, 1000, 256, 384, 8, 2),
        (torch.bfloat16, 333, 128, 256, 16, 4),
        (torch.float32, 333, 128, 256, 16, 4),
    ],
    ids=str,
)
def test_gpu_experts(backend, dtype, T, D, F, E, K):
    torch.manual_seed(0)
    x, w1, w2, w3 = [t.cuda() for t in random_experts(T, D, F, E, dtype, scale=D ** -0.5)]
    logits = torch.randn(T, E, device="cuda").to(dtype)
    weights, experts = moe_route(logits, top_k=K)
    want_w, want_e = ref.route(logits, K)
    assert torch.equal(experts, want_e)
    assert_weights_close(weights, want_w, logits.shape[-1])
    _check_grads(x, w1, w2, w3, weights, experts, factor=3.0)


@pytest.mark.gpu
@needs_C
@pytest.mark.parametrize("T,K,E,block_m", [(1, 2, 8, 16), (16384, 2, 8, 128), (5000, 8, 64, 64), (3000, 4, 256, 16)])
def test_gpu_sort_and_combine(T, K, E, block_m):
    for name, experts in _routings(T, K, E):
        experts = experts.cuda()
        got = cuda_moe.sort(experts.reshape(-1).contiguous(), E, block_m)
        want = ref.sort_align(experts, E, block_m)
        for what, a, b in zip(("sorted_ids", "tile_expert", "offsets"), got, want):
            assert torch.equal(a, b), f"{name}: {what} differs"
        y = torch.randn(T * K, 96, device="cuda")
        torch.testing.assert_close(cuda_moe.combine_weighted(y, None, experts, E, K, torch.bfloat16).float(),
                                   ref.combine(y, K, None, experts, E, torch.bfloat16).float())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=needs_C)], indirect=True)
def test_gpu_no_host_sync(backend):
    """Routing, experts and their backward never wait for the device (the contract)."""
    T, D, F, E, K = 300, 128, 256, 8, 2
    x, w1, w2, w3 = [t.cuda().bfloat16().requires_grad_() for t in random_experts(T, D, F, E, scale=0.1)]
    logits = torch.randn(T, E, device="cuda", requires_grad=True)
    moe_experts(x, w1, w2, w3, *moe_route(logits.bfloat16(), top_k=K)).float().sum().backward()  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weights, experts = moe_route(logits.bfloat16(), top_k=K)
        out = moe_experts(x, w1, w2, w3, weights, experts)
        out.float().sum().backward()
        moe_aux_loss((logits,), top_k=K)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(logits.grad).all()
