"""Benchmark plumbing shared by every suite: cases, timing, the card's roofline.

A suite is a module ``bench/<op>.py`` with ``cases(device, quick) -> list[Case | Skipped]``.
Each Case times one implementation and, in the same process, its baseline; the table
reports the median of both and their ratio. Suites are listed in ``bench/__main__.py``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    op: str                      # "mean_pool fwd"
    shape: str                   # "B=64 S=512 D=4096 bf16"
    backend: str                 # "cuda", "triton", "torch", ...
    fn: Callable[[], Any]        # the implementation under test
    baseline: Callable[[], Any] | None = None
    baseline_name: str = ""      # "eager sum(h*m)/m.sum()"
    flops: float | None = None   # FLOPs of one call (flash-attn's formulas)
    bytes: float | None = None   # fewest bytes one call must move
    extra: dict = field(default_factory=dict)


@dataclass
class Skipped:
    op: str
    shape: str
    reason: str


@dataclass
class Result:
    op: str
    shape: str
    backend: str
    device: str
    median_ms: float
    baseline_name: str = ""
    baseline_ms: float | None = None
    speedup: float | None = None       # baseline time / our time
    tflops: float | None = None
    gbps: float | None = None
    roofline_pct: float | None = None  # of the card's bf16 FLOP/s or memory bandwidth
    extra: dict = field(default_factory=dict)


def with_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with GRIT_BACKEND forced to ``backend`` (restored afterwards)."""
    def call():
        old = os.environ.get("GRIT_BACKEND")
        os.environ["GRIT_BACKEND"] = backend
        try:
            return fn()
        finally:
            if old is None:
                del os.environ["GRIT_BACKEND"]
            else:
                os.environ["GRIT_BACKEND"] = old
    return call


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device, *, budget_s: float = 0.5, min_reps: int = 5,
            max_reps: int = 200) -> float:
    """Median seconds per call. CUDA: events around each call after a warm-up, L2 not flushed
    between calls (like triton.testing.do_bench's default); CPU: perf_counter."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = int(max(min_reps, min(max_reps, budget_s / once)))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Datasheet numbers (dense bf16 tensor-core FLOP/s, memory bandwidth), the fallback when the
# device cannot be queried.
DATASHEET = {
    "H100": dict(flops=989e12, bandwidth=3.35e12),
    "H200": dict(flops=989e12, bandwidth=4.8e12),
    "A100": dict(flops=312e12, bandwidth=2.0e12),
}
# Dense bf16 FLOPs per SM per clock by compute capability major (Ampere 2048, Hopper 4096:
# 989e12 / (132 SMs * 1.83 GHz)).
FLOPS_PER_SM_CLOCK = {8: 2048, 9: 4096}


@functools.lru_cache(maxsize=None)
def roofline(device_str: str) -> dict:
    """{'name', 'flops', 'bandwidth', 'source'} for the device (None values on CPU)."""
    device = torch.device(device_str)
    if device.type != "cuda":
        return dict(name="cpu", flops=None, bandwidth=None, source="cpu: no roofline")
    props = torch.cuda.get_device_properties(device)
    name = props.name
    try:
        from cuda.bindings import runtime as cudart

        idx = device.index or 0

        def attr(a):
            err, value = cudart.cudaDeviceGetAttribute(a, idx)
            if err != cudart.cudaError_t.cudaSuccess:
                raise RuntimeError(str(err))
            return value

        A = cudart.cudaDeviceAttr
        mem_khz = attr(A.cudaDevAttrMemoryClockRate)
        bus_bits = attr(A.cudaDevAttrGlobalMemoryBusWidth)
        sm_khz = attr(A.cudaDevAttrClockRate)
        sms = attr(A.cudaDevAttrMultiProcessorCount)
        bandwidth = 2 * mem_khz * 1e3 * bus_bits / 8  # double data rate
        per_clock = FLOPS_PER_SM_CLOCK.get(props.major)
        flops = sms * sm_khz * 1e3 * per_clock if per_clock else None
        if flops is None:
            flops = _datasheet(name).get("flops")
        return dict(name=name, flops=flops, bandwidth=bandwidth, source="cuda.bindings device query")
    except Exception as e:  # cuda-python missing or the query failed
        sheet = _datasheet(name)
        return dict(name=name, flops=sheet.get("flops"), bandwidth=sheet.get("bandwidth"),
                    source=f"datasheet ({type(e).__name__}: {e})")


def _datasheet(name: str) -> dict:
    for key, value in DATASHEET.items():
        if key in name:
            return value
    return {}


def run_case(case: Case, device: torch.device, budget_s: float) -> Result:
    t = measure(case.fn, device, budget_s=budget_s)
    res = Result(op=case.op, shape=case.shape, backend=case.backend, device=str(device), median_ms=t * 1e3,
                 extra=dict(case.extra))
    if case.baseline is not None:
        tb = measure(case.baseline, device, budget_s=budget_s)
        res.baseline_name, res.baseline_ms, res.speedup = case.baseline_name, tb * 1e3, tb / t
    roof = roofline(str(device))
    if case.flops:
        res.tflops = case.flops / t / 1e12
        if roof["flops"]:
            res.roofline_pct = 100 * case.flops / t / roof["flops"]
    if case.bytes:
        res.gbps = case.bytes / t / 1e9
        if roof["bandwidth"] and not case.flops:
            res.roofline_pct = 100 * case.bytes / t / roof["bandwidth"]
    return res
