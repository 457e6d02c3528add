"""Packaging and dispatch: import hygiene, backend selection, the optional CUDA build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grit_kernels import _backend

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd="/")


def test_import_touches_neither_cuda_nor_triton():
    code = (
        "import sys, torch, grit_kernels, grit_models\n"
        "from grit_kernels import mean_pool\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
        "mean_pool(torch.randn(2, 3, 4), torch.ones(2, 3))  # a CPU call (torch's dispatcher may load triton)\n"
        "assert not torch.cuda.is_initialized(), 'torch.cuda initialised'\n"
        "print('ok')\n"
    )
    proc = _run(code)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


def test_default_selection(monkeypatch):
    monkeypatch.delenv("GRIT_BACKEND", raising=False)
    assert _backend.select("op", "cpu") == "cpu"
    expected = "cuda" if _backend.has_C() else "triton"
    assert _backend.select("op", "cuda") == expected
    assert _backend.select("op", "cuda", ("cpu", "triton")) == "triton"


def test_forcing(monkeypatch):
    monkeypatch.setenv("GRIT_BACKEND", "reference")
    assert _backend.select("op", "cuda") == "reference"
    monkeypatch.setenv("GRIT_BACKEND", "cpu")
    with pytest.raises(_backend.BackendUnavailableError, match="runs CPU tensors"):
        _backend.select("op", "cuda")
    monkeypatch.setenv("GRIT_BACKEND", "cuda")
    with pytest.raises(_backend.BackendUnavailableError, match="no cuda backend"):
        _backend.select("op", "cpu", ("cpu", "triton"))
    monkeypatch.setenv("GRIT_BACKEND", "Triton ")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.select("op", "cpu") == "triton"
    monkeypatch.setenv("GRIT_BACKEND", "xla")
    with pytest.raises(ValueError, match="GRIT_BACKEND='xla'"):
        _backend.select("op", "cpu")


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="no nvcc: the extension is legitimately absent")
def test_extension_is_built_where_nvcc_exists():
    """CI compiles csrc/: a CUDA syntax error must fail the install, and the module must load."""
    assert _backend.has_C(), _backend._load_C()
    C = _backend.C()
    assert hasattr(C, "mean_pool_forward") and hasattr(C, "mean_pool_forward_host")


def test_setup_without_nvcc_says_why(tmp_path):
    """The build says once why _C is skipped (a metadata query, which pip runs too, says
    nothing), and writes nothing into the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "GRIT_SKIP_CUDA_BUILD")}
    env.update(PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin", CUDA_HOME="/nonexistent")
    before = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
    proc = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "grit_kernels._C" not in proc.stdout + proc.stderr, proc.stderr
    build = [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path / "lib")]
    proc = subprocess.run(build, capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "grit_kernels._C" in line]
    assert len(lines) == 1 and "nvcc was not found" in lines[0], proc.stdout + proc.stderr
    env["GRIT_SKIP_CUDA_BUILD"] = "1"
    proc = subprocess.run(build, capture_output=True, text=True, env=env, cwd=ROOT)
    assert "GRIT_SKIP_CUDA_BUILD" in proc.stderr
    after = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout
    assert after == before, "setup.py wrote into the source tree"


def test_models_installs_as_grit_models():
    import grit_models

    assert Path(grit_models.__file__).resolve().parent == ROOT / "models"
    assert torch.__version__  # the CPU wheel or a CUDA build, whichever the set-up installed
