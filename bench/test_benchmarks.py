"""pytest-benchmark view of the same cases `python -m bench` runs:

    pytest bench/test_benchmarks.py --benchmark-only [--quick-bench]
"""

import importlib

import pytest
import torch

from bench.__main__ import SUITES
from bench.common import Case, sync

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _all_cases():
    found = []
    for name in SUITES:
        try:
            suite = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError:
            continue
        for case in suite.cases(DEVICE, quick=True):
            if isinstance(case, Case):
                found.append(pytest.param(case, id=f"{case.op}|{case.shape}|{case.backend}"))
    return found


@pytest.mark.parametrize("case", _all_cases())
def test_bench(benchmark, case):
    def run():
        case.fn()
        sync(DEVICE)

    benchmark(run)
