"""attention_with_kvcache on every backend vs the plain-PyTorch reference run in fp64.

CPU: torch (the reference itself, checked against independent full-sequence oracles) and
triton (interpreter, fp32/fp16; the interpreter's bf16 tl.dot is wrong, so bf16 is GPU-only).
GPU-marked: Triton compiled for the device, bf16 included, GritLM's head shape.

Oracles never come from the op under test: a full-sequence causal call of
``reference.attention_ref`` on the whole token stream (prefill + decode must reproduce it),
or ``attention_ref`` with explicit per-row key lengths on a copy of the caches appended by
plain indexing.
"""

from __future__ import annotations

import pytest
import torch

import grit_kernels
from grit_kernels import attention_with_kvcache
from grit_kernels.reference.attention import attention_ref, visible_mask
from helpers import KV_ATOL as ATOL
from helpers import assert_close_reordered, assert_close_to_oracle, compile_for_sm90, expected_caches, same
from helpers import check_kv as check
from helpers import kv_oracles as oracles
from helpers import rand

CPU_BACKENDS = ["cpu", "triton"]
# ---------------------------------------------------------------------------------------
# reference sanity: the oracle itself against a dense masked softmax written another way
# ---------------------------------------------------------------------------------------


def test_reference_mask_matches_flash_attn_convention():
    # Sq=2 new tokens over 5 keys (cache of 3): bottom-right aligned diagonal.
    m = visible_mask(2, 5, True, (-1, -1))
    assert m.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = visible_mask(3, 6, False, (1, 0))
    assert m.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]
    m = visible_mask(2, 2, True, (-1, 5))  # causal ignores right
    assert m.tolist() == [[1, 0], [1, 1]]


def test_reference_equals_sdpa():
    q, k, v = rand(2, 5, 4, 16), rand(2, 5, 2, 16), rand(2, 5, 2, 16)
    out, _ = attention_ref(q, k, v, causal=True)
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(2, 1), v.transpose(1, 2).repeat_interleave(2, 1),
        is_causal=True,
    ).transpose(1, 2)
    assert_close_reordered(out, expect, n_terms=2 * 16)  # a 5-key softmax and a 16-wide dot


# ---------------------------------------------------------------------------------------
# the op vs oracles (torch and triton backends)
# ---------------------------------------------------------------------------------------


def run_incremental(q, k, v, starts, prefill, S_max, **kw):
    """Feed each row's tokens [starts[b], ...) in one prefill chunk then one token at a time.

    Row b's first starts[b] tokens are put in the cache by the caller. Returns the list of
    (position offset, output chunk) and the final caches.
    """
    B, L, Hkv, D = k.shape
    # NaN past the lengths: a kernel that loads it, even with weight 0, outputs NaN.
    kc = torch.full((B, S_max, Hkv, D), float("nan"), dtype=k.dtype)
    vc = torch.full((B, S_max, Hkv, D), float("nan"), dtype=k.dtype)
    for b, s in enumerate(starts):
        kc[b, :s], vc[b, :s] = k[b, :s], v[b, :s]
    seqlens = torch.tensor(starts, dtype=torch.int32)
    steps = [prefill] + [1] * (L - max(starts) - prefill)
    chunks, t = [], 0
    for n in steps:
        idx = seqlens.long()[:, None] + torch.arange(n)[None, :]  # (B, n) absolute positions
        take = lambda x: x[torch.arange(B)[:, None], idx]  # noqa: E731
        out = attention_with_kvcache(take(q), kc, vc, seqlens, take(k), take(v), **kw)
        chunks.append((t, out))
        seqlens += n
        t += n
    return chunks, kc, vc


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype,Hq,Hkv,window", [
    (torch.float32, 2, 2, (-1, -1)),
    (torch.float32, 4, 1, (5, 0)),
    (torch.float32, 8, 1, (-1, -1)),
    (torch.float16, 2, 2, (5, 0)),
    (torch.float16, 4, 1, (-1, -1)),
    (torch.float16, 8, 1, (5, 0)),
], ids=["fp32-mha", "fp32-gqa4-win5", "fp32-gqa8", "fp16-mha-win5", "fp16-gqa4", "fp16-gqa8-win5"])
def test_prefill_then_decode_equals_full_sequence(backend, dtype, Hq, Hkv, window):
    B, D = 3, 64
    starts, prefill, decode = [0, 6, 2], 4, 4  # rows of different lengths in one batch
    L = max(starts) + prefill + decode
    q, k, v = rand(B, L, Hq, D, dtype=dtype), rand(B, L, Hkv, D, dtype=dtype), rand(B, L, Hkv, D, dtype=dtype)
    chunks, kc, vc = run_incremental(q, k, v, starts, prefill, S_max=L + 3, causal=True, window=window)
    hp, lp = oracles(q, k, v, causal=True, window=window)  # one full-sequence causal call
    for t, out in chunks:
        n = out.shape[1]
        for b, s in enumerate(starts):
            pos = slice(s + t, s + t + n)
            assert_close_to_oracle(out[b], hp[b, pos], lp[b, pos], atol=ATOL[dtype], name=f"row {b} step {t}")
    # Each row's cache holds exactly its tokens.
    for b, s in enumerate(starts):
        n = s + prefill + decode
        assert torch.equal(kc[b, :n], k[b, :n]) and torch.equal(vc[b, :n], v[b, :n])


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("Sq", [1, 3])
@pytest.mark.parametrize("causal,window", [
    (True, (-1, -1)), (True, (4, 0)), (True, (0, 0)), (False, (-1, -1)), (False, (3, 2)), (False, (-1, 1)),
    (False, (0, 0)),
], ids=["causal", "causal-(4,0)", "causal-(0,0)", "bidir", "bidir-(3,2)", "bidir-(-1,1)", "bidir-(0,0)"])
def test_against_reference_varlen(backend, Sq, causal, window):
    B, S_max, Hq, Hkv, D = 3, 40, 8, 2, 64
    seqlens = torch.tensor([0, 17, 36], dtype=torch.int32)
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    for b in range(B):  # NaN past each row's keys: must never be loaded
        kc[b, int(seqlens[b]) + Sq:] = float("nan")
        vc[b, int(seqlens[b]) + Sq:] = float("nan")
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v, causal=causal, window=window, softmax_scale=0.2)
    assert same(kc, ekc) and same(vc, evc)
    check(out, q, ekc, evc, causal=causal, window=window, softmax_scale=0.2, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.parametrize("backend", ["cpu"], indirect=True)
@pytest.mark.parametrize("path", ["gemv", "flash"])
@pytest.mark.parametrize("window", [(-1, -1), (50, 0)], ids=["full", "left-50"])
@pytest.mark.parametrize("lengths", [[300, 300, 300], [0, 17, 299]], ids=["equal", "uneven"])
def test_cpu_decode_paths(backend, path, window, lengths, monkeypatch):
    """The cpu backend's decode (Sq = 1): per-row views of the visible keys, through the
    fp32 GEMV pair (path "gemv") or the fused kernel ("flash"); NaN past every row's keys."""
    from grit_kernels.cpu import attention_kvcache as cpu_kv

    monkeypatch.setattr(cpu_kv, "_GEMV_MIN", 0 if path == "gemv" else 1 << 62)
    B, S_max, Hq, Hkv, D = 3, 320, 8, 2, 64
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q, k, v = rand(B, 1, Hq, D), rand(B, 1, Hkv, D), rand(B, 1, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    for b in range(B):
        kc[b, lengths[b] + 1:] = float("nan")
        vc[b, lengths[b] + 1:] = float("nan")
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v, window=window)
    check(out, q, ekc, evc, window=window, seqlens_k=(seqlens + 1).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("D", [64, 96, 128])
def test_head_dims(backend, D):
    B, S_max, Hq, Hkv, Sq = 2, 33, 4, 1, 2
    seqlens = torch.tensor([31, 5], dtype=torch.int32)
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)
    check(out, q, ekc, evc, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("Sq", [1, 7])
def test_long_cache(backend, Sq):
    B, Hq, Hkv, D = 1, 8, 2, 128
    seqlens = torch.tensor([1025], dtype=torch.int32)
    S_max = 1025 + Sq
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    check(out, q, ekc, evc, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("B,Sq,Hq,Hkv,D", [(0, 1, 4, 2, 64), (2, 0, 4, 2, 64), (2, 2, 2, 1, 8), (1, 3, 3, 3, 1)],
                         ids=["B=0", "Sq=0", "D=8", "D=1"])
def test_degenerate_sizes(backend, B, Sq, Hq, Hkv, D):
    S_max = 9
    seqlens = torch.tensor([4, 6][:B], dtype=torch.int32)
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    assert out.shape == (B, Sq, Hq, D)
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)
    check(out, q, ekc, evc, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_append_writes_exactly_the_new_slots(backend):
    B, S_max, Hkv, D, Sq = 3, 12, 2, 64, 3
    seqlens = torch.tensor([0, 4, 9], dtype=torch.int32)  # row 2 fills the cache to the brim
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    k, v = rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    before_k, before_v = kc.clone(), vc.clone()
    seqlens_before = seqlens.clone()
    attention_with_kvcache(rand(B, Sq, 4, D), kc, vc, seqlens, k, v)
    changed = (kc != before_k).any(dim=(2, 3)) | (vc != before_v).any(dim=(2, 3))  # (B, S_max)
    want = torch.zeros(B, S_max, dtype=torch.bool)
    for b, s in enumerate(seqlens_before.tolist()):
        want[b, s:s + Sq] = True
    assert torch.equal(changed, want)
    ekc, evc = expected_caches(before_k, before_v, seqlens_before, k, v)
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)
    assert torch.equal(seqlens, seqlens_before), "cache_seqlens must not be advanced"


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_strided_caches(backend):
    # Caches as views: K and V interleaved in one buffer (B, S_max, 2, Hkv, D), q a slice
    # of a fused QKV projection, lengths a strided view. Only the last dim is contiguous.
    B, S_max, Hq, Hkv, D, Sq = 2, 20, 4, 2, 64, 2
    kv = rand(B, S_max, 2, Hkv, D)
    kc, vc = kv[:, :, 0], kv[:, :, 1]
    qkv = rand(B, Sq, Hq + 2 * Hkv, D)
    q, k, v = qkv[:, :, :Hq], qkv[:, :, Hq:Hq + Hkv], qkv[:, :, Hq + Hkv:]
    seqlens = torch.tensor([3, 7, 18, 0], dtype=torch.int32)[::2]  # a strided view: [3, 18]
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    assert torch.equal(kv[:, :, 0], ekc) and torch.equal(kv[:, :, 1], evc)
    check(out, q, ekc, evc, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("Sq", [1, 2])
def test_without_new_kv_attends_to_cache_prefix(backend, Sq):
    # No append: row b attends to cache[:cache_seqlens[b]]; an empty row gives zeros, not NaN.
    B, S_max, Hq, Hkv, D = 3, 24, 4, 2, 64
    seqlens = torch.tensor([7, 0, 24], dtype=torch.int32)
    q, kc, vc = rand(B, Sq, Hq, D), rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    before = kc.clone(), vc.clone()
    for causal in (True, False):
        out = attention_with_kvcache(q, kc, vc, seqlens, causal=causal)
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        check(out, q, kc, vc, causal=causal, seqlens_k=seqlens.tolist())


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_bidirectional_prefix_then_causal_decode(backend):
    """GritLM's doc caching: embed a document bidirectionally into an empty cache, then decode."""
    B, Hq, Hkv, D = 2, 8, 2, 64
    doc, new = 11, 4
    L = doc + new
    q, k, v = rand(B, L, Hq, D), rand(B, L, Hkv, D), rand(B, L, Hkv, D)
    kc, vc = torch.zeros(B, L, Hkv, D), torch.zeros(B, L, Hkv, D)
    seqlens = torch.zeros(B, dtype=torch.int32)
    emb = attention_with_kvcache(q[:, :doc], kc, vc, seqlens, k[:, :doc], v[:, :doc], causal=False)
    check(emb, q[:, :doc], k[:, :doc], v[:, :doc], causal=False)  # the bidirectional pass itself
    seqlens += doc
    # Every generated token sees the whole document and the generated tokens before it:
    # exactly the full-sequence causal mask restricted to rows >= doc.
    hp, lp = oracles(q, k, v, causal=True)
    for t in range(doc, L):
        out = attention_with_kvcache(q[:, t:t + 1], kc, vc, seqlens, k[:, t:t + 1], v[:, t:t + 1])
        assert_close_to_oracle(out, hp[:, t:t + 1], lp[:, t:t + 1], name=f"token {t}")
        seqlens += 1
    # A chunk of queries after the prefix: the prefix is fully visible, causal among the new.
    kc2, vc2 = torch.zeros_like(kc), torch.zeros_like(vc)
    kc2[:, :doc], vc2[:, :doc] = k[:, :doc], v[:, :doc]
    sl = torch.full((B,), doc, dtype=torch.int32)
    out = attention_with_kvcache(q[:, doc:], kc2, vc2, sl, k[:, doc:], v[:, doc:])
    assert_close_to_oracle(out, hp[:, doc:], lp[:, doc:], name="chunk after the document")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
@pytest.mark.parametrize("window", [(-1, -1), (6, 0)], ids=str)
def test_triton_split_counts(num_splits, window, monkeypatch):
    """The direct path (1 split) and the combine path, with splits left empty by short rows."""
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    from grit_kernels.triton import attention_kvcache as tri

    B, S_max, Hq, Hkv, D, Sq = 3, 64, 4, 2, 64, 2
    seqlens = torch.tensor([1, 30, 62], dtype=torch.int32)  # appended lengths 3, 32, 64
    q, kc, vc = rand(B, Sq, Hq, D), rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    out = tri.attention(q, kc, vc, seqlens, Sq, causal=True, window=window, softmax_scale=0.125,
                        num_splits=num_splits)
    check(out, q, kc, vc, causal=True, window=window, softmax_scale=0.125, seqlens_k=(seqlens + Sq).tolist())


def test_triton_prefill_with_cache_many_row_blocks(monkeypatch):
    """Sq * G larger than one row block: several query blocks, each with its own KV range."""
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    B, S_max, Hq, Hkv, D, Sq = 1, 80, 4, 1, 64, 37
    seqlens = torch.tensor([40], dtype=torch.int32)
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    for window in ((-1, -1), (9, 0)):
        out = attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, k, v, window=window)
        check(out, q, ekc, evc, window=window, seqlens_k=(seqlens + Sq).tolist())


# ---------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_opcheck(backend):
    B, S_max, Hq, Hkv, D, Sq = 2, 16, 4, 2, 64, 2
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    q, k, v = rand(B, Sq, Hq, D), rand(B, Sq, Hkv, D), rand(B, Sq, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)
    op = torch.ops.grit.attention_with_kvcache.default
    torch.library.opcheck(op, (q, kc, vc, seqlens, k, v, True, -1, 0, 0.125))
    torch.library.opcheck(op, (q, kc, vc, seqlens, None, None, False, 2, 1, 0.125))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_torch_compile_fullgraph(backend):
    B, S_max, Hq, Hkv, D = 2, 16, 4, 2, 64
    seqlens = torch.tensor([3, 9], dtype=torch.int32)
    q, k, v = rand(B, 1, Hq, D), rand(B, 1, Hkv, D), rand(B, 1, Hkv, D)
    kc, vc = rand(B, S_max, Hkv, D), rand(B, S_max, Hkv, D)

    def step(q, kc, vc, seqlens, k, v):
        return attention_with_kvcache(q * 2, kc, vc, seqlens, k, v).sum(dim=-1)

    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc1, vc1, seqlens, k, v)
    want = step(q, kc2, vc2, seqlens, k, v)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc1, kc2) and torch.equal(vc1, vc2)  # the in-place append survives tracing


# ---------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, caches untouched
# ---------------------------------------------------------------------------------------


def _good(B=2, Sq=2, Hq=4, Hkv=2, D=64, S_max=8):
    return dict(q=rand(B, Sq, Hq, D), k_cache=rand(B, S_max, Hkv, D), v_cache=rand(B, S_max, Hkv, D),
                cache_seqlens=torch.tensor([1, 3], dtype=torch.int32), k=rand(B, Sq, Hkv, D), v=rand(B, Sq, Hkv, D))


def _with(**changes):
    def make():
        a = _good()
        for key, fn in changes.items():
            a[key] = fn(a)
        return a
    return make


BAD = [
    ("hq_not_multiple", _with(q=lambda a: rand(2, 2, 3, 64)), ValueError, "k_cache: Hkv = 2 KV heads must divide"),
    ("mismatched_D", _with(k_cache=lambda a: rand(2, 8, 2, 32)), ValueError, "k_cache: head dim 32"),
    ("mismatched_D_new_k", _with(k=lambda a: rand(2, 2, 2, 32)), ValueError, "k: expected shape"),
    ("v_cache_shape", _with(v_cache=lambda a: rand(2, 9, 2, 64)), ValueError, "v_cache: expected shape"),
    ("batch", _with(k_cache=lambda a: rand(3, 8, 2, 64), v_cache=lambda a: rand(3, 8, 2, 64)), ValueError,
     "k_cache: expected batch 2"),
    ("seqlens_dtype", _with(cache_seqlens=lambda a: torch.tensor([1, 3])), TypeError,
     "cache_seqlens: expected dtype int32"),
    ("seqlens_shape", _with(cache_seqlens=lambda a: torch.tensor([1, 3, 0], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected shape"),
    ("seqlens_2d", _with(cache_seqlens=lambda a: torch.tensor([[1, 3]], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected shape"),
    ("cache_too_small", _with(cache_seqlens=lambda a: torch.tensor([1, 7], dtype=torch.int32)), ValueError,
     r"cache_seqlens: cache_seqlens\[1\] \+ Sq = 7 \+ 2 exceeds"),
    ("negative_seqlens", _with(cache_seqlens=lambda a: torch.tensor([-1, 3], dtype=torch.int32)), ValueError,
     "cache_seqlens: expected non-negative"),
    ("q_last_dim_strided", _with(q=lambda a: rand(2, 2, 4, 128)[..., ::2]), ValueError, "q: the last dim"),
    ("cache_last_dim_strided", _with(k_cache=lambda a: rand(2, 8, 2, 128)[..., ::2]), ValueError,
     "k_cache: the last dim"),
    ("k_without_v", _with(v=lambda a: None), ValueError, "v: k and v are appended together"),
    ("v_without_k", _with(k=lambda a: None), ValueError, "k: k and v are appended together"),
    ("dtype_mix", _with(k_cache=lambda a: a["k_cache"].half()), TypeError, "k_cache: expected dtype float32"),
    ("int_q", _with(q=lambda a: torch.ones(2, 2, 4, 64, dtype=torch.int64)), TypeError, "q: expected dtype"),
    ("q_3d", _with(q=lambda a: rand(2, 4, 64)), ValueError, "q: expected 4 dimensions"),
    ("not_a_tensor", _with(k=lambda a: [[0.0]]), TypeError, "k: expected a torch.Tensor"),
    ("same_cache_tensor", _with(v_cache=lambda a: a["k_cache"]), ValueError, "v_cache: written in place but shares"),
    ("expanded_cache", _with(k_cache=lambda a: rand(1, 8, 2, 64).expand(2, 8, 2, 64)), ValueError,
     "k_cache: written in place but its elements overlap"),
    # v_cache is k_cache shifted by one position inside one (2, 9, 2, 64) buffer
    ("caches_overlap", _with(k_cache=lambda a: rand(2, 9, 2, 64)[:, :8],
                             v_cache=lambda a: a["k_cache"].as_strided(a["k_cache"].shape, a["k_cache"].stride(),
                                                                         a["k_cache"].storage_offset() + 128)),
     ValueError, "v_cache: written in place but shares memory with k_cache"),
    ("zero_scale", _with(softmax_scale=lambda a: 0.0), ValueError, "softmax_scale: expected a finite number > 0"),
    ("negative_scale", _with(softmax_scale=lambda a: -0.125), ValueError, "softmax_scale: expected a finite"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("name,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, name, make, exc, match):
    a = make()
    kc = a["k_cache"].clone() if isinstance(a["k_cache"], torch.Tensor) else None
    vc = a["v_cache"].clone() if isinstance(a["v_cache"], torch.Tensor) else None
    with pytest.raises(exc, match=match):
        attention_with_kvcache(**a)
    assert torch.equal(a["k_cache"], kc) and torch.equal(a["v_cache"], vc), "a rejected call wrote the cache"


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_lengths_changed_behind_the_version_counter_are_checked(backend):
    """CPU lengths are read on every call: a change through .numpy() (which bumps no version
    counter) is caught by the host check before anything is written."""
    a = _good()
    attention_with_kvcache(**a)
    a["cache_seqlens"].numpy()[1] = 7  # 7 + Sq 2 > S_max 8
    kc = a["k_cache"].clone()
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        attention_with_kvcache(**a)
    assert torch.equal(a["k_cache"], kc)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_runs_under_inference_mode(backend, mode):
    """inference_mode tensors have no version counter: the op must not need one."""
    ctx = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    a = _good()
    want_kc, want_vc = expected_caches(a["k_cache"], a["v_cache"], a["cache_seqlens"], a["k"], a["v"])
    with ctx:
        b = {key: (t.clone() if isinstance(t, torch.Tensor) else t) for key, t in a.items()}
        out = attention_with_kvcache(**b)
        out2 = attention_with_kvcache(**b)  # a second layer on the same lengths
    assert torch.equal(b["k_cache"], want_kc) and torch.equal(b["v_cache"], want_vc)
    check(out, a["q"], want_kc, want_vc, seqlens_k=(a["cache_seqlens"] + a["q"].shape[1]).tolist())
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def _clamp_check(num_splits, device):
    """The kernels themselves stay inside each row, whatever cache_seqlens says (the host
    check is bypassed here by calling the launchers directly). The caches are views of a
    larger NaN-filled buffer, so a read past a row's capacity (into the next row or past the
    last one) shows up as NaN; a write shows up in the poisoned margins."""
    from grit_kernels.triton import attention_kvcache as tri

    def make(*shape):
        return torch.randn(*shape).to(device)

    B, S_max, Hq, Hkv, D, Sq = 2, 8, 4, 2, 64, 2
    buf_k = torch.full((B + 1, S_max + 4, Hkv, D), float("nan"), device=device)
    buf_v = torch.full((B + 1, S_max + 4, Hkv, D), float("nan"), device=device)
    kc, vc = buf_k[:B, :S_max], buf_v[:B, :S_max]
    kc.copy_(make(B, S_max, Hkv, D))
    vc.copy_(make(B, S_max, Hkv, D))
    before_k, before_v = buf_k.clone(), buf_v.clone()
    q, k, v = make(B, Sq, Hq, D), make(B, Sq, Hkv, D), make(B, Sq, Hkv, D)
    lengths = torch.tensor([S_max + 5, -3], dtype=torch.int32, device=device)  # far outside [0, S_max - Sq]
    tri.append_kv(kc, vc, lengths, k, v)
    assert same(buf_k, before_k) and same(buf_v, before_v), "an out-of-range append wrote memory"
    for sq_new in (0, Sq):
        out = tri.attention(q, kc, vc, lengths, sq_new, causal=True, window=(-1, -1),
                            softmax_scale=D ** -0.5, num_splits=num_splits)
        assert torch.isfinite(out).all(), "the kernel read past a row's capacity"
        # Row 0 is clamped to all S_max keys, row 1 to the Sq_new appended ones (0 or Sq).
        check(out[:1].cpu(), q[:1].cpu(), kc[:1].cpu(), vc[:1].cpu(), seqlens_k=[S_max])
        if sq_new:
            check(out[1:].cpu(), q[1:].cpu(), kc[1:].cpu(), vc[1:].cpu(), seqlens_k=[sq_new])


@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_kernel_clamps_lengths_to_the_capacity(num_splits):
    _clamp_check(num_splits, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_kernel_clamps_lengths_to_the_capacity(num_splits):
    """The same on a GPU: NaN-poisoned device memory past every row's capacity."""
    _clamp_check(num_splits, "cuda")


@pytest.mark.parametrize("window,exc,match", [
    ((-2, 0), ValueError, "window: expected values >= -1"),
    ((0, -5), ValueError, "window: expected values >= -1"),
    ((1,), TypeError, "window: expected a"),
    ((1.5, 0), TypeError, "window: expected a"),
])
def test_bad_window(window, exc, match):
    a = _good()
    kc = a["k_cache"].clone()
    with pytest.raises(exc, match=match):
        attention_with_kvcache(**a, window=window)
    assert torch.equal(a["k_cache"], kc)


def test_bad_scale_and_causal():
    with pytest.raises(ValueError, match="softmax_scale"):
        attention_with_kvcache(**_good(), softmax_scale=float("nan"))
    with pytest.raises(TypeError, match="causal"):
        attention_with_kvcache(**_good(), causal=1)


def test_not_differentiable_is_clear():
    a = _good()
    a["q"].requires_grad_()
    out = attention_with_kvcache(**a)
    with pytest.raises(RuntimeError):
        out.sum().backward()


def test_public_name():
    assert grit_kernels.attention_with_kvcache is attention_with_kvcache


# ---------------------------------------------------------------------------------------
# compiled for a GPU target without a GPU: catches what the interpreter lets through
# (tl.dot shape rules, layouts, constexpr branches never taken on CPU)
# ---------------------------------------------------------------------------------------

_AOT_SCRIPT = r"""
from grit_kernels.triton import attention_kvcache as m

def kbuild(fn, types, constexprs):
    # What a launch specialises: 16-byte aligned pointers, strides and D multiples of 16.
    return build(fn, types, constexprs, aligned=lambda n: n.endswith("_ptr") or n.startswith("stride_") or n == "D")

def attn_types(p):
    return {"q_ptr": p, "kc_ptr": p, "vc_ptr": p, "seqlens_ptr": "*i32", "out_ptr": p,
            "opart_ptr": "*fp32", "lse_ptr": "*fp32", "qk_scale": "fp32"}

for dt, group, causal, left, right, split, bm, bn, bd in [
    ("bf16", 4, True, False, False, True, 16, 64, 128),   # decode, split KV
    ("bf16", 8, True, True, False, False, 128, 64, 128),  # prefill over a cache, window
    ("fp32", 1, False, True, True, True, 32, 32, 64),     # ieee dot, bidirectional window
]:
    kbuild(m._attn_kernel, attn_types("*" + dt), dict(GROUP=group, CAUSAL=causal, HAS_LEFT=left, HAS_RIGHT=causal or right,
                                                     SPLIT=split, PREC="ieee" if dt == "fp32" else "tf32",
                                                     BLOCK_M=bm, BLOCK_N=bn,
                                                     BLOCK_D=bd))
kbuild(m._combine_kernel, {"opart_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
       dict(GROUP=4, BLOCK_S=32, CHUNK=16, BLOCK_D=128))
kbuild(m._append_kv_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*bf16", "vc_ptr": "*bf16",
                             "seqlens_ptr": "*i32"}, dict(BLOCK_H=8, BLOCK_D=128))
"""


def test_kernels_compile_for_sm90():
    """Ahead-of-time compile (TTIR -> PTX -> cubin with the ptxas bundled in triton) for H100."""
    compile_for_sm90(_AOT_SCRIPT, "attention_kvcache")


# ---------------------------------------------------------------------------------------
# GPU: Triton compiled for the device
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("Sq", [1, 4, 200])
def test_gpu_against_reference(dtype, D, Sq, monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    B, Hq, Hkv, S_max = 3, 32, 8, 3000
    seqlens = torch.tensor([0, 1000, S_max - Sq], dtype=torch.int32, device="cuda")
    q, k, v = (rand(B, Sq, h, D, dtype=dtype, device="cuda") for h in (Hq, Hkv, Hkv))
    kc, vc = rand(B, S_max, Hkv, D, dtype=dtype, device="cuda"), rand(B, S_max, Hkv, D, dtype=dtype, device="cuda")
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    for window in ((-1, -1), (256, 0)):
        kc1, vc1 = kc.clone(), vc.clone()
        out = attention_with_kvcache(q, kc1, vc1, seqlens, k, v, window=window)
        assert torch.equal(kc1, ekc) and torch.equal(vc1, evc)
        check(out, q, ekc, evc, window=window, seqlens_k=(seqlens + Sq).tolist())


@pytest.mark.gpu
@pytest.mark.parametrize("B,S_max", [(1, 32768), (16, 4096), (64, 1024)])
def test_gpu_decode_gritlm_shape(B, S_max, monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    Hq, Hkv, D, dtype = 32, 8, 128, torch.bfloat16
    seqlens = torch.randint(0, S_max, (B,), dtype=torch.int32, device="cuda")
    q, k, v = (rand(B, 1, h, D, dtype=dtype, device="cuda") for h in (Hq, Hkv, Hkv))
    kc, vc = rand(B, S_max, Hkv, D, dtype=dtype, device="cuda"), rand(B, S_max, Hkv, D, dtype=dtype, device="cuda")
    ekc, evc = expected_caches(kc, vc, seqlens, k, v)
    out = attention_with_kvcache(q, kc, vc, seqlens, k, v)
    assert torch.equal(kc, ekc) and torch.equal(vc, evc)
    check(out, q, ekc, evc, seqlens_k=(seqlens + 1).tolist())


@pytest.mark.gpu
def test_gpu_prefill_then_decode(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    B, Hq, Hkv, D, dtype = 2, 32, 8, 128, torch.bfloat16
    L, prefill = 600, 500
    q, k, v = (rand(B, L, h, D, dtype=dtype, device="cuda") for h in (Hq, Hkv, Hkv))
    kc = torch.zeros(B, 1024, Hkv, D, dtype=dtype, device="cuda")
    vc = torch.zeros_like(kc)
    seqlens = torch.zeros(B, dtype=torch.int32, device="cuda")
    hp, lp = oracles(q, k, v, causal=True)
    out = attention_with_kvcache(q[:, :prefill], kc, vc, seqlens, k[:, :prefill], v[:, :prefill])
    assert_close_to_oracle(out, hp[:, :prefill], lp[:, :prefill], atol=ATOL[dtype])
    seqlens += prefill
    for t in range(prefill, L):
        s = slice(t, t + 1)
        out = attention_with_kvcache(q[:, s], kc, vc, seqlens, k[:, s], v[:, s])
        assert_close_to_oracle(out, hp[:, s], lp[:, s], atol=ATOL[dtype], name=f"token {t}")
        seqlens += 1


@pytest.mark.gpu
def test_gpu_opcheck_and_compile(monkeypatch):
    """Also the one kv-cache GPU test that runs the autotuner (the others pin one config)."""
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    monkeypatch.setenv("GRIT_AUTOTUNE", "1")
    B, S_max, Hq, Hkv, D = 2, 256, 8, 2, 128
    seqlens = torch.tensor([3, 200], dtype=torch.int32, device="cuda")
    q, k, v = (rand(B, 1, h, D, dtype=torch.float16, device="cuda") for h in (Hq, Hkv, Hkv))
    kc = rand(B, S_max, Hkv, D, dtype=torch.float16, device="cuda")
    vc = rand(B, S_max, Hkv, D, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.grit.attention_with_kvcache.default, (q, kc, vc, seqlens, k, v, True, -1, 0, 0.1))
    f = torch.compile(lambda *a: attention_with_kvcache(*a), fullgraph=True)
    kc1, vc1 = kc.clone(), vc.clone()
    got = f(q, kc1, vc1, seqlens, k, v)
    want = attention_with_kvcache(q, kc.clone(), vc.clone(), seqlens, k, v)
    torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_gpu_cache_too_small_is_checked(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "triton")
    a = {key: (t.cuda() if isinstance(t, torch.Tensor) else t) for key, t in _good().items()}
    a["cache_seqlens"] = torch.tensor([1, 7], dtype=torch.int32, device="cuda")
    kc = a["k_cache"].clone()
    with pytest.raises(ValueError, match="cache_seqlens"):
        attention_with_kvcache(**a)
    assert torch.equal(a["k_cache"], kc)
