"""Test set-up. TRITON_INTERPRET must be set before Triton is first imported.

CPU runs (CI): Triton kernels run on CPU tensors under the interpreter.
GPU runs (bench/gpu_check.sh sets GRIT_GPU_TESTS=1): Triton compiles for the device, and the
tests marked `gpu` run; without a CUDA device they are skipped.
"""

import os

if os.environ.get("GRIT_GPU_TESTS", "0") in ("", "0"):
    os.environ["TRITON_INTERPRET"] = "1"

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
