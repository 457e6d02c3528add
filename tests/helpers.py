"""Shared test utilities: tolerances in flash-attn's style and small input builders."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from grit_kernels import attention
from grit_kernels.reference.attention import attention_ref


def assert_close_to_oracle(out, oracle_hp, oracle_lp, *, atol=1e-5, factor=2.0, name="output"):
    """flash-attn's rule: |out - oracle_hp| <= factor * |oracle_lp - oracle_hp| + atol.

    ``oracle_hp`` is the reference in high precision (fp64/fp32), ``oracle_lp`` the same
    reference run in the kernel's low precision: the kernel may be at most ``factor`` times
    as wrong as plain PyTorch in that precision.
    """
    out, hp, lp = out.double(), oracle_hp.double(), oracle_lp.double()
    assert out.shape == hp.shape, f"{name}: shape {tuple(out.shape)} != {tuple(hp.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (out - hp).abs().max().item() if out.numel() else 0.0
    ref_err = (lp - hp).abs().max().item() if out.numel() else 0.0
    bound = factor * ref_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x reference error {ref_err:.3e} + {atol:.1e}"


def scaled_atol(oracle_hp, dtype, ulps: float = 16.0) -> float:
    """An absolute floor for ``assert_close_to_oracle`` that scales with the values: ``ulps``
    units of ``dtype``'s rounding at the oracle's largest magnitude. For values of any size
    (gradients, sums), where a bare atol like 1e-6 is too tight for large ones and says
    nothing for tiny ones."""
    scale = oracle_hp.double().abs().max().item() if oracle_hp.numel() else 0.0
    return ulps * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def reduction_atol(values, dtype, n_terms: int, k: float = 2.0) -> float:
    """Rounding bound for two evaluations of one floating-point computation that differ only
    in summation order (another chunking, blocking, thread split or process count):
    ``k * n_terms * eps(dtype) * max|values|``, the classic n·u bound of an n-term sum
    (Higham, Accuracy and Stability of Numerical Algorithms, 4.2) at the values' magnitude.
    ``n_terms`` is the longest chain of additions behind one output element."""
    v = torch.as_tensor(values).double()
    scale = v.abs().max().item() if v.numel() else 0.0
    return k * n_terms * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def assert_close_reordered(got, want, *, n_terms: int, name: str = "output", k: float = 2.0):
    """``got`` equals ``want`` up to ``reduction_atol``: the same computation in the same
    precision, summed in another order. For comparisons that have no fp64 oracle at hand
    (a distributed run against one process, a batch against its rows)."""
    got_t, want_t = torch.as_tensor(got), torch.as_tensor(want)
    atol = reduction_atol(want_t, want_t.dtype if want_t.is_floating_point() else torch.float32, n_terms, k)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_grads_close_to_oracle(got: dict, hp: dict, lp: dict, *, factor=2.0, ulps=16.0):
    """``assert_close_to_oracle`` over dicts of gradients: each within ``factor`` times the
    error of the same computation in low precision (``lp``) from the fp64 oracle (``hp``),
    plus ``scaled_atol``."""
    assert got.keys() == hp.keys() == lp.keys(), (sorted(got), sorted(hp))
    for name in hp:
        assert_close_to_oracle(got[name], hp[name], lp[name], factor=factor,
                               atol=scaled_atol(hp[name], lp[name].dtype, ulps), name=name)


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    """int32 offsets (B + 1,) of sequences of the given lengths."""
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + int(n))
    return torch.tensor(cu, dtype=torch.int32, device=device)


# Ahead-of-time compilation of Triton kernels for H100 (sm_90) on a machine without a GPU:
# catches what the interpreter accepts but the compiler rejects (non-constexpr globals,
# type mismatches between branches, shared-memory overflows). Runs in a subprocess because
# this process's @triton.jit functions were built for the interpreter.
AOT_PRELUDE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, types, constexprs, warps=4, stages=3, aligned=lambda name: name.endswith("_ptr")):
    """Compile fn to a cubin for sm_90. types: arg -> Triton type ("*bf16", "fp32"; default "i32").
    aligned(name): args a launch would see 16-byte aligned / divisible by 16."""
    names = fn.arg_names
    sig = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if aligned(n)}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    ptrs = sorted({t for t in sig.values() if t.startswith("*")})
    name = f"{fn.__name__}[{','.join(f'{c}={constexprs[c]}' for c in sorted(constexprs))}]w{warps}s{stages}{ptrs}"
    RECORDS[name] = dict(_resources(k), shared=k.metadata.shared)
    return k

RECORDS = {}  # kernel specialisation -> registers, spills, stack and shared memory

def _resources(k):
    """ptxas -v on the kernel's PTX: what the cubin uses per thread (no GPU needed)."""
    import os, re, subprocess, tempfile
    from triton.backends.nvidia import compiler as nv
    try:
        ptxas = nv.get_ptxas(90).path
    except TypeError:  # triton 3.6: get_ptxas() takes no arch
        ptxas = nv.get_ptxas().path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    try:
        log = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else 0
    return dict(registers=num(r"Used (\d+) registers"), stack=num(r"(\d+) bytes stack frame"),
                spill_stores=num(r"(\d+) bytes spill stores"), spill_loads=num(r"(\d+) bytes spill loads"))

from grit_kernels.triton._common import SHARED_BYTES as H100_SHARED  # what one block may use

def compile_launch(fn, args, constexprs, warps=4, stages=3):
    """Compile fn as a launch with these argument values would specialise it (triton 3.9's rules):
    args: name -> pointer type ("*bf16", aligned) or the int / float value passed; floats are
    fp32, ints equal to 1 become constexprs, ints divisible by 16 are marked so, except the
    ints the kernel lists in do_not_specialize (plain i32 whatever their value)."""
    types, consts, aligned = {}, dict(constexprs), set()
    plain = {fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    for n, a in args.items():
        if isinstance(a, str):
            types[n] = a
            aligned.add(n)
        elif isinstance(a, float):
            types[n] = "fp32"
        elif n in plain:
            types[n] = "i64" if abs(a) >= 2**31 else "i32"
        elif a == 1:
            consts[n] = 1
        else:
            types[n] = "i64" if abs(a) >= 2**31 else "i32"
            if a % 16 == 0:
                aligned.add(n)
    missing = set(fn.arg_names) - set(types) - set(consts)
    assert not missing, f"{fn.__name__}: no value for {sorted(missing)}"
    k = build(fn, types, consts, warps, stages, aligned=aligned.__contains__)
    assert k.metadata.shared <= H100_SHARED, f"{fn.__name__}: {k.metadata.shared} bytes of shared memory"
    return k
'''


def compile_for_sm90(script: str, name: str | None = None) -> dict:
    """Run ``script`` (which calls ``build(...)``) after AOT_PRELUDE with TRITON_INTERPRET=0;
    returns each kernel's resources, checked against the recorded ones under ``name``."""
    import os
    import subprocess
    import sys

    import pytest

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as e:
        pytest.skip(f"triton without its nvidia backend: {e}")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    tail = "\nimport json\nprint('compiled', json.dumps(RECORDS))"
    res = subprocess.run([sys.executable, "-c", AOT_PRELUDE + script + tail], env=env,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("no ptxas available")
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
    records = json.loads(res.stdout.split("compiled", 1)[1])
    if name is not None:
        check_resources(name, records)
    return records


def _aot_baseline() -> pathlib.Path:
    """tests/aot_sm90.json for the test extra's triton (3.9); aot_sm90_triton<X.Y>.json for
    another compiler (CI also compiles under 3.6, the GPU machine's), whose numbers differ."""
    import triton

    version = ".".join(triton.__version__.split(".")[:2])
    name = "aot_sm90.json" if version == "3.9" else f"aot_sm90_triton{version}.json"
    return pathlib.Path(__file__).with_name(name)


AOT_BASELINE = _aot_baseline()


def check_resources(name: str, records: dict) -> None:
    """No kernel of ``records`` may use more spill bytes, stack or shared memory than the
    numbers recorded in tests/aot_sm90.json under ``name`` (registers may move: ptxas trades
    them for occupancy). ``GRIT_AOT_RECORD=1`` rewrites that entry instead (after a change
    that is meant to move the numbers, reviewed in the diff)."""
    import os

    baseline = json.loads(AOT_BASELINE.read_text()) if AOT_BASELINE.exists() else {}
    if os.environ.get("GRIT_AOT_RECORD") == "1":
        baseline[name] = records
        AOT_BASELINE.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        return
    want = baseline.get(name)
    assert want is not None, f"no AOT baseline for {name!r} in {AOT_BASELINE.name}: run with GRIT_AOT_RECORD=1"
    missing = sorted(set(want) - set(records))
    assert not missing, f"{name}: kernels no longer compiled: {missing[:5]}"
    worse = [f"{k}: {f} {want[k][f]} -> {got[f]}" for k, got in records.items() if k in want
             for f in ("spill_stores", "spill_loads", "stack", "shared") if got[f] > want[k][f]]
    assert not worse, f"{name}: kernels use more memory than recorded:\n" + "\n".join(worse)


# ---------------------------------------------------------------------------------------
# attention: inputs, the fwd+bwd runner and the check against the oracles (shared by
# test_attention, test_attention_kvcache and test_attention_cpu_fast)
# ---------------------------------------------------------------------------------------

ATTN_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def padded_inputs(B, Sq, Sk, Hq, Hkv, D, dtype=torch.float32, device="cpu", scale=1.0):
    q = torch.randn(B, Sq, Hq, D, device=device) * scale
    k = torch.randn(B, Sk, Hkv, D, device=device) * scale
    v = torch.randn(B, Sk, Hkv, D, device=device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def packed_inputs(lens_q, lens_k, Hq, Hkv, D, dtype=torch.float32, device="cpu"):
    cu_q, cu_k = cu_seqlens_of(lens_q, device), cu_seqlens_of(lens_k, device)
    q = torch.randn(sum(lens_q), Hq, D, device=device).to(dtype)
    k = torch.randn(sum(lens_k), Hkv, D, device=device).to(dtype)
    v = torch.randn(sum(lens_k), Hkv, D, device=device).to(dtype)
    return q, k, v, dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def fwd_bwd(fn, q, k, v, dout, dlse, dtype=None):
    """Run fn -> (out, lse) and backpropagate (dout, dlse); returns out, lse, dq, dk, dv."""
    ins = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v)]
    out, lse = fn(*ins)
    # Rows with lse = -inf have no gradient to give; keep the product finite.
    dl = torch.where(torch.isfinite(lse), dlse.to(lse.dtype), torch.zeros_like(lse))
    torch.autograd.backward((out, lse), (dout.to(out.dtype), dl))
    # No key at all (Sk = 0): autograd leaves k.grad unset where the kernel writes zeros.
    return (out.detach(), lse.detach(), *(torch.zeros_like(t) if t.grad is None else t.grad for t in ins))


def check_attention(q, k, v, *, atol=None, grads=True, lse_grad=True, **kw):
    """``attention`` (whatever backend is selected) vs the fp64 and low-precision oracles:
    out, lse and (``grads``) dq, dk, dv. ``lse_grad``: backpropagate a random lse gradient
    too (False: lse gets a zero gradient, a loss of out only)."""
    dtype = q.dtype
    atol = ATTN_ATOL[dtype] if atol is None else atol
    B_H_S = (q.shape[1], q.shape[0]) if "cu_seqlens_q" in kw else (q.shape[0], q.shape[2], q.shape[1])
    dout = torch.randn(q.shape, device=q.device)
    dlse = torch.randn(B_H_S, device=q.device) if lse_grad else torch.zeros(B_H_S, device=q.device)
    ref_kw = {n: kw[n] for n in ("causal", "window", "softmax_scale", "cu_seqlens_q", "cu_seqlens_k") if n in kw}
    if "cu_seqlens_q" in kw and "cu_seqlens_k" not in kw:
        ref_kw["cu_seqlens_k"] = kw["cu_seqlens_q"]
    kernel = lambda *t: attention(*t, return_lse=True, **kw)  # noqa: E731
    got = fwd_bwd(kernel, q, k, v, dout, dlse) if grads else attention(q, k, v, return_lse=True, **kw)
    hp = fwd_bwd(lambda *t: attention_ref(*t, **ref_kw), q, k, v, dout, dlse, torch.float64)
    lp = fwd_bwd(lambda *t: attention_ref(*t, upcast=False, **ref_kw), q, k, v, dout, dlse)
    assert got[1].dtype == torch.float32 and got[0].dtype == dtype
    empty = torch.isneginf(hp[1])
    assert torch.equal(torch.isneginf(got[1]), empty), "lse: -inf (rows that see no key) in the wrong places"
    fin = lambda t: torch.where(empty, torch.zeros_like(t), t)  # noqa: E731
    assert_close_to_oracle(got[0], hp[0], lp[0], atol=atol, name="out")
    assert_close_to_oracle(fin(got[1]), fin(hp[1]), fin(lp[1].float()), atol=atol, name="lse")
    if grads:
        for name, g, h, lo in zip(("dq", "dk", "dv"), got[2:], hp[2:], lp[2:]):
            assert g.dtype == dtype and g.shape == h.shape
            assert_close_to_oracle(g, h, lo, atol=atol, name=name)
    return got


ATTN_MODES = [
    pytest.param(False, (-1, -1), id="bidirectional"),
    pytest.param(True, (-1, -1), id="causal"),
    pytest.param(True, (16, -1), id="causal-window16"),
    pytest.param(False, (16, 0), id="window(w,0)"),
    pytest.param(False, (8, 8), id="window(w,w)"),
    pytest.param(False, (0, 0), id="window(0,0)"),
    pytest.param(False, (5, 23), id="window(5,23)"),
    pytest.param(False, (-1, 3), id="window(-1,3)"),
    pytest.param(False, (40, -1), id="window(40,-1)"),
]


def opcheck_args(packed):
    if packed:
        q, k, v, cu = packed_inputs([3, 1, 6], [5, 2, 6], 4, 2, 16)
        args = (q, k, v, cu["cu_seqlens_q"], cu["cu_seqlens_k"], 6, 6, True, 2, -1, 0.3)
    else:
        q, k, v = padded_inputs(2, 7, 9, 4, 2, 16)
        args = (q, k, v, None, None, -1, -1, False, 3, 1, 0.25)
    return tuple(a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


KV_ATOL = {torch.float32: 1e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(dtype).to(device)


def kv_oracles(q, k, v, *, causal=True, window=(-1, -1), softmax_scale=None, seqlens_k=None):
    """(fp64 oracle, same reference in the inputs' precision) for the tolerance rule."""
    kw = dict(causal=causal, window=window, softmax_scale=softmax_scale, seqlens_k=seqlens_k)
    hp, _ = attention_ref(q.double(), k.double(), v.double(), **kw)
    lp, _ = attention_ref(q, k, v, upcast=q.dtype == torch.float32, **kw)
    return hp, lp


def check_kv(out, q, k, v, name="out", **kw):
    hp, lp = kv_oracles(q, k, v, **kw)
    assert out.dtype == q.dtype
    assert_close_to_oracle(out, hp, lp, atol=KV_ATOL[q.dtype], name=name)


def same(a, b) -> bool:
    """Bitwise-equal values, NaN equal to NaN (caches carry NaN past the lengths)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def expected_caches(k_cache, v_cache, cache_seqlens, k, v):
    """The caches after the append, by plain indexing (independent of both backends)."""
    kc, vc = k_cache.clone(), v_cache.clone()
    for b in range(k.shape[0]):
        s = int(cache_seqlens[b])
        kc[b, s:s + k.shape[1]] = k[b]
        vc[b, s:s + k.shape[1]] = v[b]
    return kc, vc
