"""bench/compile_plan.py: recording a GPU run's Triton launches on the CPU, and compiling them
for sm_90 into Triton's cache. Runs in subprocesses: this process's kernels are interpreted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton.backends.nvidia.compiler", reason="triton without its nvidia backend")


def _run(code: str, tmp_path, **env) -> dict:
    full = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / "cache"), **env}
    full.pop("GRIT_BACKEND", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


RECORD = r"""
import json, torch
from bench import compile_plan as cp
bf16 = torch.bfloat16
def case(Sq, Hq=8, Hkv=2, D=128, causal=True):
    return lambda: cp._attention(bf16, causal, (-1, -1), Hq, Hkv, D, Sq=Sq)
out = {}
for name, cases in {"64": [case(64)], "1": [case(1)], "48": [case(48)], "97": [case(97)],
                    "d64": [case(64, D=64)], "bidir": [case(64, causal=False)]}.items():
    out[name] = [s[1] for s in cp.record(cases, autotune=False)]
import os
cache = os.environ["TRITON_CACHE_DIR"]
out["cache_entries"] = len(os.listdir(cache)) if os.path.isdir(cache) else 0
print(json.dumps(out))
"""


def test_recording_specialises_like_a_launch_and_compiles_nothing(tmp_path):
    out = _run(RECORD, tmp_path)
    # forward, the delta preprocess, dK/dV and dQ: one specialisation each.
    assert sorted(out["64"]) == sorted(["_attn_fwd_kernel", "_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel",
                                        "_attn_bwd_dq_kernel"])
    assert out["cache_entries"] == 0, "recording must not compile"


def test_sequence_length_is_not_a_specialisation(tmp_path):
    """Lengths 1, 48 (a multiple of 16), 64 and 97 launch the same four kernels: no recompiles
    for a new length (do_not_specialize), while the head dim and the mask mode do specialise."""
    code = RECORD.replace("out[name] = [s[1] for s in", "out[name] = [s[2] for s in")
    out = _run(code, tmp_path)
    assert out["1"] == out["48"] == out["64"] == out["97"]
    assert not set(out["d64"]) & set(out["64"])
    shared = [json.loads(s)["name"].rsplit(".", 1)[1] for s in set(out["bidir"]) & set(out["64"])]
    assert shared == ["_bwd_preprocess_kernel"]  # the only kernel without a mask


COMPILE = r"""
import json, torch
from bench import compile_plan as cp
entries = [dict(phase="t", op="mean_pool", launched=0,
                new=cp.record([lambda: cp._mean_pool(torch.bfloat16, 2, 8, 4096, True, True)], autotune=False))]
rows = cp.compile_all(entries, workers=1)
import os
print(json.dumps(dict(rows=rows, entries=len(os.listdir(os.environ["TRITON_CACHE_DIR"])))))
"""


def test_compile_fills_the_triton_cache_for_sm90(tmp_path):
    out = _run(COMPILE, tmp_path)
    (row,) = out["rows"]
    assert row["compiled"] == 2  # forward and backward kernels
    assert out["entries"] >= 2
    # What was compiled is sm_90 code: a cubin for that arch sits in the cache.
    cubins = list((tmp_path / "cache").rglob("*.cubin"))
    assert len(cubins) >= 2
    meta = [json.loads(p.read_text()) for p in (tmp_path / "cache").rglob("*.json") if not p.name.startswith("__")]
    assert {m["target"]["arch"] for m in meta if "target" in m} == {90}


LAUNCH_AFTER_WARM = r"""
import json, os, torch
from bench import compile_plan as cp
from triton import knobs
from triton.runtime import driver
from grit_kernels.triton import _common
case = lambda: cp._mean_pool(torch.bfloat16, 2, 8, 4096, True, True)
cp.compile_all([dict(phase="t", op="mean_pool", launched=0, new=cp.record([case], autotune=False))], workers=1)
cache = os.environ["TRITON_CACHE_DIR"]
before = sorted(os.listdir(cache))
# Now the launch itself, as a run would make it: Triton's own path, no recording hook.
compiled = []
knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append(kw["fn"].name)
driver.set_active(cp._PlanDriver())
_common.PLANNED_SMS = cp.SM90_SMS
os.environ["GRIT_BACKEND"] = "triton"
try:
    case()
    error = None
except Exception as e:  # the stand-in driver cannot load the cubin: past the compile step
    error = type(e).__name__
print(json.dumps(dict(compiled=compiled, new=sorted(set(os.listdir(cache)) - set(before)), error=error)))
"""


def test_a_launch_after_the_warm_up_finds_its_kernel_in_the_cache(tmp_path):
    """The run's own launch reaches Triton's compile step and finds the warmed cubin: no new
    cache entry (the key a launch computes is the key the warm-up filled)."""
    out = _run(LAUNCH_AFTER_WARM, tmp_path)
    assert out["compiled"] == ["_mean_pool_fwd_kernel"], out
    assert out["new"] == [], out
    assert out["error"] is not None  # nothing can be launched without a GPU
