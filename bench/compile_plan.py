"""The Triton compilations a GPU run needs: recorded before it starts, compiled in parallel.

    python -m bench.compile_plan --phase tests --count           # how many, per op (no compile)
    python -m bench.compile_plan --phase all --compile --workers 16 --json plan.jsonl

Recording drives each phase's op calls (``PHASES``: the shape families of the GPU tests and
of the bench suites) with CPU tensors while ``triton.knobs.runtime.jit_cache_hook`` is set:
every launch binds its arguments and specialises exactly as it would on the device, hands
the hook the serialised specialisation, and neither compiles nor launches. The launchers
take their GPU branch (tile sizes, split counts for a 132-SM device) because
``grit_kernels.triton._common.PLANNED_SMS`` is set.

Compiling runs ``JITFunction.preload`` on each specialisation in a process pool: the cubins
land in Triton's on-disk cache (``TRITON_CACHE_DIR``), where the run's own launches find
them, so the tests and benchmarks that follow spend no time in the compiler. A stand-in
driver reports an sm_90 device, so the same binder and compiler run on a machine without a
GPU: that is what ``bench/gpu_check.sh --dry-run`` times, and the same cubins a GPU run
would build (Triton's cache key is the source, the specialisation, the options and the
ptxas version; the driver is not part of it).

A shape family missing here costs one compile in the run itself; ``bench/gpu_check.sh``
counts those (``tests/conftest.py``'s compile counter) so the plan can be completed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Callable

os.environ.setdefault("TRITON_INTERPRET", "0")
if os.environ["TRITON_INTERPRET"] not in ("", "0"):
    raise SystemExit("bench.compile_plan compiles for a GPU: unset TRITON_INTERPRET")

import torch  # noqa: E402

from .common import env  # noqa: E402

SM90_SMS = 132  # H100 SXM and H200


class _PlanDriver:
    """Triton's view of an sm_90 device, for binding and compiling without one (never launches)."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")




@contextlib.contextmanager
def recording():
    """Within: Triton launches record their specialisation instead of compiling/launching.
    Yields the dict it fills: (module, kernel, specialisation JSON) -> None, in launch order."""
    from triton import knobs
    from triton.runtime.autotuner import Autotuner

    from grit_kernels.triton import _common

    specs: dict[tuple[str, str, str], None] = {}

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        specs[(fn.module, fn.name, compile["specialization_data"])] = None
        return True  # skip: the launch returns before compiling

    def every_config(self, *args, **kwargs):
        # The autotuner would benchmark; here each config it would try is one compilation.
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None

    from triton.runtime import driver

    # driver._active, not .active: reading .active creates the default driver, which fails
    # on a machine without a GPU; None restores "create it when first needed".
    saved = knobs.runtime.jit_cache_hook, Autotuner.run, _common.PLANNED_SMS, driver._active
    driver.set_active(_PlanDriver())
    knobs.runtime.jit_cache_hook, Autotuner.run, _common.PLANNED_SMS = hook, every_config, SM90_SMS
    try:
        yield specs
    finally:
        knobs.runtime.jit_cache_hook, Autotuner.run, _common.PLANNED_SMS, driver._active = saved


# ---------------------------------------------------------------------------------------
# shape families (small tensors: the ints that change with the size are not specialised)
# ---------------------------------------------------------------------------------------


def _attention(dtype, causal, window, Hq, Hkv, D, packed=False, Sq=64, Sk=None, backward=True):
    from grit_kernels import attention

    Sk = Sq if Sk is None else Sk
    if packed:
        lens = [Sq, 3, 1]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        shape_q, shape_k, kw = (sum(lens), Hq, D), (sum(lens), Hkv, D), dict(cu_seqlens_q=cu, cu_seqlens_k=cu)
    else:
        shape_q, shape_k, kw = (2, Sq, Hq, D), (2, Sk, Hkv, D), {}
    q = torch.zeros(shape_q, dtype=dtype, requires_grad=backward)
    k, v = (torch.zeros(shape_k, dtype=dtype, requires_grad=backward) for _ in range(2))
    out, lse = attention(q, k, v, causal=causal, window=window, return_lse=True, **kw)
    if backward:
        torch.autograd.backward((out, lse), (torch.zeros_like(out), torch.zeros_like(lse)))


def _kvcache(dtype, D, Sq, window=(-1, -1), B=3, Hq=32, Hkv=8, S_max=3000, append=True):
    from grit_kernels import attention_with_kvcache

    q = torch.zeros(B, Sq, Hq, D, dtype=dtype)
    k = v = torch.zeros(B, Sq, Hkv, D, dtype=dtype) if append else None
    kc, vc = (torch.zeros(B, S_max, Hkv, D, dtype=dtype) for _ in range(2))
    seqlens = torch.zeros(B, dtype=torch.int32)
    attention_with_kvcache(q, kc, vc, seqlens, k, v, window=window)


def _mean_pool(dtype, B, S, D, normalize, weighted, packed=False):
    from grit_kernels import mean_pool

    if packed:
        cu = torch.tensor([0, S, S + 3, S + 3], dtype=torch.int32)
        h = torch.zeros(S + 3, D, dtype=dtype, requires_grad=True)
        out = mean_pool(h, cu_seqlens=cu, skip=torch.tensor([1, 0, 0], dtype=torch.int32), normalize=normalize,
                        weighted=weighted)
    else:
        h = torch.zeros(B, S, D, dtype=dtype, requires_grad=True)
        out = mean_pool(h, torch.ones(B, S, dtype=torch.long), normalize=normalize, weighted=weighted)
    out.backward(torch.zeros_like(out))


def _contrastive(dtype, B, N, D):
    from grit_kernels import contrastive_loss

    q = torch.zeros(B, D, dtype=dtype, requires_grad=True)
    d = torch.zeros(N, D, dtype=dtype, requires_grad=True)
    contrastive_loss(q, d, targets=torch.zeros(B, dtype=torch.long)).backward()


def _moe(dtype, T, D, F, E, K, backward=True):
    from grit_kernels import moe_experts

    x = torch.zeros(T, D, dtype=dtype, requires_grad=backward)
    w1, w3 = (torch.zeros(E, F, D, dtype=dtype, requires_grad=backward) for _ in range(2))
    w2 = torch.zeros(E, D, F, dtype=dtype, requires_grad=backward)
    experts = (torch.arange(T * K) % E).reshape(T, K).to(torch.int32)
    weights = torch.full((T, K), 1.0 / K, dtype=dtype, requires_grad=backward)
    out = moe_experts(x, w1, w2, w3, weights, experts)
    if backward:
        out.backward(torch.zeros_like(out))


bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
NO_WINDOW = (-1, -1)


def _cases_tests():
    """What the `gpu` tests launch (GRIT_AUTOTUNE=0: one config each), by op. Mirrors the
    parametrisations in tests/test_*.py; bench/gpu_check.sh reports what it missed."""
    c: dict[str, list] = {}
    c["attention"] = [
        # test_gpu_padded (GPU_CASES), test_gpu_deterministic_backward
        *(lambda a=a: _attention(*a) for a in [
            (bf16, False, NO_WINDOW, 8, 2, 128), (bf16, True, NO_WINDOW, 4, 4, 64),
            (bf16, False, (256, 0), 8, 2, 128), (bf16, False, (100, 37), 16, 2, 96),
            (fp16, True, NO_WINDOW, 8, 2, 128), (fp16, False, NO_WINDOW, 16, 2, 96),
            (bf16, True, NO_WINDOW, 32, 8, 128)]),
        # test_gpu_packed_and_uneven: packed 16/4 and padded Sq != Sk with 8/1
        *(lambda dt=dt, c=c_: (_attention(dt, c, NO_WINDOW, 16, 4, 128, packed=True),
                               _attention(dt, c, NO_WINDOW, 8, 1, 128, Sq=30, Sk=100))
          for dt, c_ in ((bf16, True), (fp32, False))),
        # test_gpu_opcheck_and_compile: the opcheck args on the device, then the autotuner
        lambda: (_attention(fp32, True, (2, -1), 4, 2, 16, packed=True),
                 _attention(fp32, False, (3, 1), 4, 2, 16)),
        lambda: _with_autotune(lambda: _attention(bf16, True, NO_WINDOW, 8, 2, 128, backward=False)),
    ]
    c["attention_kvcache"] = [
        # test_gpu_against_reference: dtype x D x Sq x window
        *(lambda a=(dt, D, Sq, w): _kvcache(*a)
          for dt in (bf16, fp16, fp32) for D in (64, 96, 128) for Sq in (1, 4, 200) for w in (NO_WINDOW, (256, 0))),
        # test_gpu_decode_gritlm_shape, test_gpu_prefill_then_decode, test_gpu_opcheck_and_compile,
        # test_gpu_kernel_clamps_lengths_to_the_capacity (num_splits 1 and split)
        *(lambda B=B, S=S: _kvcache(bf16, 128, 1, B=B, S_max=S) for B, S in ((1, 32768), (16, 4096), (64, 1024))),
        lambda: (_kvcache(bf16, 128, 500, B=2, S_max=1024), _kvcache(bf16, 128, 1, B=2, S_max=1024)),
        lambda: _with_autotune(lambda: _kvcache(fp16, 128, 1, B=2, Hq=8, Hkv=2, S_max=256)),
    ]
    c["mean_pool"] = [
        *(lambda a=(dt, B, S, D, n, w): _mean_pool(*a)
          for dt in (bf16, fp16, fp32) for B, S, D in ((64, 8, 4096), (1, 9, 4096), (3, 7, 4097), (5, 1, 1))
          for n, w in ((False, False), (True, True))),
        *(lambda dt=dt, w=w: _mean_pool(dt, 1, 40, 4096, True, w, packed=True) for dt in (bf16, fp32)
          for w in (False, True)),
    ]
    c["contrastive_loss"] = [
        *(lambda a=(dt, B, N, D): _contrastive(*a)
          for dt in (bf16, fp16, fp32) for B, N, D in ((1, 3, 64), (97, 194, 4096), (300, 1025, 257))),
        lambda: _contrastive(bf16, 256, 512, 4096),
    ]
    c["moe"] = [
        *(lambda a=a: _moe(*a) for a in [(bf16, 1, 256, 512, 8, 2), (bf16, 1000, 256, 384, 8, 2),
                                         (bf16, 333, 128, 256, 16, 4), (fp32, 333, 128, 256, 16, 4),
                                         (bf16, 300, 128, 256, 8, 2)]),
    ]
    # test_model_backends, test_host_sync, test_generation, test_grad_cache, test_training:
    # tiny checkpoints in fp32 and bf16
    c["model"] = [lambda a=a: _model(*a) for a in [("mistral", "float32", 8), ("mixtral", "float32"),
                                                     ("mistral", "bfloat16", 8), ("mistral", "float32")]]
    return c


def _model(arch: str, dtype: str, sliding_window=None):
    """A tiny checkpoint's encode and generate (what the model-level gpu tests run: the
    model's shapes go through every op it calls)."""
    import tempfile

    import grit_models as gm
    from grit_models.testing import make_checkpoint, random_texts

    with tempfile.TemporaryDirectory() as tmp:
        extra = {} if sliding_window is None else dict(sliding_window=sliding_window)
        model = gm.GritModel(str(make_checkpoint(f"{tmp}/m", arch, **extra)), device="cpu", torch_dtype=dtype)
        model.encode(random_texts(4, 1, 60, seed=1), instruction=gm.gritlm_instruction_format("q"))
        ids = torch.tensor([[1, 5, 9, 22, 40, 7], [0, 0, 1, 5, 9, 3]])
        model.generate(ids, (ids != 0).long(), max_new_tokens=3, pad_token_id=0)


def _with_autotune(fn):
    with env(GRIT_AUTOTUNE=1):
        fn()


def _cases_bench(quick: bool) -> dict[str, list]:
    """What ``python -m bench`` launches on a GPU (autotuned: every config that fits)."""
    c: dict[str, list] = {}
    c["attention"] = [
        lambda a=(causal, Hq, Hkv, packed): _attention(bf16, a[0], NO_WINDOW, a[1], a[2], 128, packed=a[3])
        for causal in (False, True) for Hq, Hkv, packed in ((16, 16, False), (32, 8, False), (32, 8, True))
    ]
    batches = (1, 16) if quick else (1, 4, 16, 64)
    c["attention_kvcache"] = [lambda B=B: _kvcache(bf16, 128, 1, window=NO_WINDOW, B=B, S_max=1024)
                              for B in batches]
    c["mean_pool"] = [lambda: _mean_pool(bf16, 16, 8, 4096, False, False),
                      lambda: _mean_pool(bf16, 16, 8, 4096, False, False, packed=True)]
    c["contrastive_loss"] = [lambda: _contrastive(bf16, 64, 128, 4096), lambda: _contrastive(fp32, 64, 128, 512)]
    tokens = (1, 256, 4096) if quick else (1, 16, 256, 4096, 16384)
    c["moe"] = [lambda T=T: _moe(bf16, T, 128, 256, 8, 2) for T in tokens]
    return c


def phases() -> dict[str, dict[str, list]]:
    """Phase -> op -> case callables, in the order bench/gpu_check.sh runs them."""
    return {"tests": _cases_tests(), "headline": _cases_bench(quick=True), "sweeps": _cases_bench(quick=False)}


def record(cases: list[Callable[[], None]], autotune: bool) -> list[tuple[str, str, str]]:
    """The distinct specialisations these calls launch, in first-launch order."""
    with env(GRIT_BACKEND="triton", GRIT_AUTOTUNE=int(autotune)), recording() as specs:
        for case in cases:
            case()
    return list(specs)


def plan(which: str = "all") -> list[dict]:
    """One entry per (phase, op): its specialisations, each counted once in the first phase
    that needs it (a later phase finds it in the cache)."""
    seen: set = set()
    out = []
    for phase, ops in phases().items():
        for op, cases in ops.items():
            specs = record(cases, autotune=phase != "tests")
            new = [s for s in specs if s not in seen]
            seen.update(new)
            out.append(dict(phase=phase, op=op, launched=len(specs), new=new))
    return [e for e in out if which in ("all", e["phase"])]


def _compile_one(spec: tuple[str, str, str]) -> float:
    """Worker: compile one specialisation into Triton's cache; -> seconds it took."""
    module, name, data = spec
    on_device = torch.cuda.is_available()
    if not on_device:
        from triton.runtime import driver

        driver.set_active(_PlanDriver())
    fn = getattr(importlib.import_module(module), name)
    t0 = time.perf_counter()
    k = fn.preload(data)
    if on_device:
        # Load it and build its launcher too: triton 3.6 compiles a C launcher per signature
        # with the host compiler at first launch (also cached in TRITON_CACHE_DIR).
        k._init_handles()
    return time.perf_counter() - t0


def compile_all(entries: list[dict], workers: int, out_path: str | None = None) -> list[dict]:
    """Compile every new specialisation of ``entries`` with ``workers`` processes; appends one
    JSON line per phase/op to ``out_path`` as each finishes. -> the per-op summaries."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # the parent may hold a CUDA context
    summaries = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for e in entries:
            t0 = time.perf_counter()
            seconds = list(pool.map(_compile_one, e["new"]))
            row = dict(phase=e["phase"], op=e["op"], launched=e["launched"], compiled=len(e["new"]),
                       cpu_s=round(sum(seconds), 2), wall_s=round(time.perf_counter() - t0, 2),
                       workers=workers, slowest_s=round(max(seconds, default=0.0), 2))
            summaries.append(row)
            _emit(row, out_path)
    return summaries


def _emit(row: dict, out_path: str | None) -> None:
    print(json.dumps(row), flush=True)
    if out_path:
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compile_plan", description=__doc__.split("\n\n")[0])
    ap.add_argument("--phase", default="all", choices=["all", *phases()])
    ap.add_argument("--count", action="store_true", help="record and count only (no compile)")
    ap.add_argument("--compile", action="store_true", help="compile into Triton's cache")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="append one JSON line per phase/op here")
    args = ap.parse_args(argv)
    entries = plan(args.phase)
    if args.compile:
        compile_all(entries, args.workers, args.json)
    else:
        for e in entries:
            _emit(dict(phase=e["phase"], op=e["op"], launched=e["launched"], compiled=len(e["new"])), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
