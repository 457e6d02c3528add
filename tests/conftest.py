"""Test set-up. TRITON_INTERPRET must be set before Triton is first imported.

CPU runs (CI): Triton kernels run on CPU tensors under the interpreter.
GPU runs (bench/gpu_check.sh sets GRIT_GPU_TESTS=1): Triton compiles for the device, and the
tests marked `gpu` run; without a CUDA device they are skipped.

GPU runs pin one Triton config per kernel specialisation (GRIT_AUTOTUNE=0, unless a test
sets it) so that each compiles once, and take two settings from bench/gpu_check.sh:
GRIT_TEST_TIMEOUT (seconds): a test that runs longer fails, and the run goes on to its
summary; GRIT_TEST_LOG (a path): one JSON line per test as it ends, with its outcome,
seconds and the Triton compilations it caused (new entries in TRITON_CACHE_DIR: kernels
the compile plan, bench/compile_plan.py, did not warm).
"""

import json
import os
import signal

if os.environ.get("GRIT_GPU_TESTS", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.setdefault("GRIT_AUTOTUNE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def backend(request, monkeypatch):
    """Parametrise indirectly with a backend name; sets GRIT_BACKEND for the test."""
    monkeypatch.setenv("GRIT_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _cache_entries() -> int:
    root = os.environ.get("TRITON_CACHE_DIR")
    return len(os.listdir(root)) if root and os.path.isdir(root) else 0


class _TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("GRIT_TEST_TIMEOUT", "0") or 0)
    if limit <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise _TestTimeout(f"{item.nodeid} ran past GRIT_TEST_TIMEOUT={limit:g} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_RUNNING: dict = {}  # nodeid -> [worst outcome, seconds, cache entries at setup]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if os.environ.get("GRIT_TEST_LOG"):
        _RUNNING[item.nodeid] = ["passed", 0.0, _cache_entries()]


def pytest_runtest_logreport(report):
    log = os.environ.get("GRIT_TEST_LOG")
    state = _RUNNING.get(report.nodeid) if log else None
    if state is None:
        return
    state[1] += report.duration
    if report.outcome == "failed" or (report.outcome == "skipped" and state[0] == "passed"):
        state[0] = report.outcome
    if report.when == "teardown":
        del _RUNNING[report.nodeid]
        row = dict(test=report.nodeid, outcome=state[0], seconds=round(state[1], 3),
                   compiles=_cache_entries() - state[2])
        with open(log, "a") as f:
            f.write(json.dumps(row) + "\n")
