"""Benchmark plumbing shared by every suite: cases, timing, the card's roofline.

A suite is a module ``bench/<op>.py`` with ``cases(device, quick) -> list[Case | Skipped]``.
Each Case times one implementation and, in the same process, its baseline; the table
reports the median of both and their ratio. Suites are listed in ``bench/__main__.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# The card's roofline lives in the package (python -m grit_kernels reports it too).
from grit_kernels._device import roofline  # noqa: F401  (re-exported for the suites)


@dataclass
class Case:
    op: str                      # "mean_pool fwd"
    shape: str                   # "B=64 S=512 D=4096 bf16"
    backend: str                 # "cuda", "triton", "cpu", ...
    fn: Callable[[], Any]        # the implementation under test
    baseline: Callable[[], Any] | None = None
    baseline_name: str = ""      # "eager sum(h*m)/m.sum()"
    flops: float | None = None   # FLOPs of one call (flash-attn's formulas)
    bytes: float | None = None   # fewest bytes one call must move
    extra: dict = field(default_factory=dict)
    threads: int = 1             # CPU threads for this case (op microbenchmarks: one)


@dataclass
class Skipped:
    op: str
    shape: str
    reason: str


@dataclass
class Stats:
    """Per-call times of one implementation: median and interquartile range, in ms."""
    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0


# A row is marked noisy when the interquartile range of its per-round ratios exceeds this
# share of their median: the ratio then says less than its digits suggest.
NOISY_SPREAD = 0.25


@dataclass
class Result:
    op: str
    shape: str
    backend: str
    device: str
    median_ms: float
    q1_ms: float | None = None
    q3_ms: float | None = None
    reps: int = 0
    threads: int | None = None          # CPU threads the case ran with (None on GPU)
    baseline_name: str = ""
    baseline_ms: float | None = None
    baseline_q1_ms: float | None = None
    baseline_q3_ms: float | None = None
    baseline_reps: int = 0
    speedup: float | None = None       # median over rounds of baseline time / our time
    speedup_q1: float | None = None    # interquartile range of the per-round ratios
    speedup_q3: float | None = None
    noisy: bool = False                # the per-round ratios spread too wide to support the median
    tflops: float | None = None
    gbps: float | None = None
    roofline_pct: float | None = None  # of the card's bf16 FLOP/s or memory bandwidth
    extra: dict = field(default_factory=dict)


@contextlib.contextmanager
def env(**values):
    """Environment variables set (str of each value) within, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def with_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run with GRIT_BACKEND forced to ``backend`` (restored afterwards)."""
    def call():
        with env(GRIT_BACKEND=backend):
            return fn()
    return call


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_one(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call. CUDA: events around the call (L2 not flushed between calls, like
    triton.testing.do_bench's default); CPU: perf_counter."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _stats(times: list[float]) -> Stats:
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return Stats(med * 1e3, q1 * 1e3, q3 * 1e3, len(times))


def _settled(times: list[float], rel: float) -> bool:
    """The median's standard error (from the IQR, as for a normal sample) is below ``rel``
    of the median."""
    s = _stats(times)
    se = 1.2533 * (s.q3_ms - s.q1_ms) / 1.349 / len(times) ** 0.5
    return se <= rel * s.median_ms


def measure(fn: Callable[[], Any], device: torch.device, *, baseline: Callable[[], Any] | None = None,
            budget_s: float = 0.5, min_reps: int = 25, max_reps: int = 100_000,
            rel: float = 0.005) -> tuple[Stats, Stats | None, float | None]:
    """Times ``fn`` and ``baseline`` alternately (one call of each per round, so both see the
    same machine state) until the medians and the median of the per-round ratios are settled
    to ``rel`` or ``budget_s`` is spent, after at least ``min_reps`` rounds (fewer, down to
    5, for a case whose rounds take longer than budget_s * 4 / min_reps).

    Returns (stats of fn, stats of baseline or None, stats of the ratio or None): the ratio
    series is baseline time / fn time per round (its "ms" fields hold plain ratios). Pairing each call with its neighbour cancels the
    slow drifts of a shared machine (another process, frequency changes) that a ratio of two
    separate medians keeps."""
    fns = [fn] + ([baseline] if baseline is not None else [])
    for f in fns:  # first calls: compilation, autotuning, allocator
        f()
        sync(device)
    # Warm-up rounds, discarded (at least two, and a tenth of the budget): caches, the
    # allocator, branch predictors and the CPU's clock settle.
    warm_start = time.perf_counter()
    warm_until = warm_start + 0.1 * budget_s
    rounds = 0
    while rounds < 2 or time.perf_counter() < warm_until:
        for f in fns:
            _time_one(f, device)
        rounds += 1
    # A case whose round takes seconds (the --full CPU encode corpus: 18 s) stops after as
    # few as 5 rounds once the budget is spent, not min_reps (25 rounds: 7.5 minutes for a row).
    round_s = (time.perf_counter() - warm_start) / rounds
    min_reps = max(min(5, min_reps), min(min_reps, math.ceil(4 * budget_s / max(round_s, 1e-9))))
    times: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    while True:
        # ABBA order: each side runs first in every other round, so neither always finds the
        # caches as the other left them.
        order = range(len(fns)) if len(times[0]) % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            times[i].append(_time_one(fns[i], device))
        n = len(times[0])
        if n >= max_reps:
            break
        if n >= min_reps:
            series = times + ([[b / a for a, b in zip(*times)]] if baseline is not None else [])
            if time.perf_counter() - start >= budget_s or all(_settled(ts, rel) for ts in series):
                break
    stats = [_stats(ts) for ts in times]
    if baseline is None:
        return stats[0], None, None
    ratios = [b / a for a, b in zip(*times)]
    r = _stats(ratios)  # in "ms" units of a unitless series: scaled back below
    return stats[0], stats[1], Stats(r.median_ms / 1e3, r.q1_ms / 1e3, r.q3_ms / 1e3, r.reps)


def run_case(case: Case, device: torch.device, budget_s: float) -> Result:
    """Measure one case. On the CPU the case's thread count is pinned for its duration (one
    thread unless the case says otherwise) and recorded."""
    threads = None
    saved = torch.get_num_threads()
    if device.type == "cpu":
        threads = case.threads
        torch.set_num_threads(threads)
    try:
        ours, base, ratio = measure(case.fn, device, baseline=case.baseline, budget_s=budget_s)
    finally:
        torch.set_num_threads(saved)
    t = ours.median_ms / 1e3
    res = Result(op=case.op, shape=case.shape, backend=case.backend, device=str(device), median_ms=ours.median_ms,
                 q1_ms=ours.q1_ms, q3_ms=ours.q3_ms, reps=ours.reps, threads=threads, extra=dict(case.extra))
    if base is not None:
        res.baseline_name, res.baseline_ms = case.baseline_name, base.median_ms
        res.baseline_q1_ms, res.baseline_q3_ms, res.baseline_reps = base.q1_ms, base.q3_ms, base.reps
        res.speedup, res.speedup_q1, res.speedup_q3 = ratio.median_ms, ratio.q1_ms, ratio.q3_ms
        res.noisy = ratio.spread > NOISY_SPREAD
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
