"""Backend selection, shared by every op in ``grit_kernels/ops``.

Four backends, one package each, named after what runs (see DESIGN.md, Backends). Every
backend module of an op (``grit_kernels/<backend>/<op>.py``) has the same ``forward`` /
``backward`` signatures, so ``ops/<op>.py`` only validates, picks the module and calls it:

* ``cuda``      - launchers over the pybind11 module ``grit_kernels._C`` built from ``csrc/``.
  On CUDA tensors they launch the CUDA kernels; on CPU tensors they run the host build of
  the same ``__host__ __device__`` per-row code (that is how CPU tests reach csrc's arithmetic).
* ``triton``    - the Triton kernels. Needs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``cpu``       - CPU tensors: PyTorch's fused CPU kernels where one serves (attention), and
  vectorised PyTorch written for speed elsewhere.
* ``reference`` - the plain-PyTorch oracles the tests compare against. Never chosen by
  default: only ``GRIT_BACKEND=reference`` runs it (on any device).

The choice is made per call from the tensors' device and what is available, unless the
environment variable ``GRIT_BACKEND`` forces one. Nothing here touches ``torch.cuda`` or
compiles anything at import time: ``_C`` and ``triton`` are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
import os

BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError):
    """Raised when ``GRIT_BACKEND`` forces a backend that cannot run these tensors."""


@functools.lru_cache(maxsize=None)
def _load_C():
    """The compiled module, or the reason it is absent (a string)."""
    try:
        return importlib.import_module("grit_kernels._C")
    except ImportError as e:  # not built (no nvcc, GRIT_SKIP_CUDA_BUILD=1) or broken
        return f"grit_kernels._C could not be imported ({e})"


def C():
    """The compiled ``_C`` module; raises BackendUnavailableError if it was not built."""
    mod = _load_C()
    if isinstance(mod, str):
        raise BackendUnavailableError(mod + "; reinstall with nvcc on PATH to build it")
    return mod


def has_C() -> bool:
    return not isinstance(_load_C(), str)


@functools.lru_cache(maxsize=None)
def has_triton() -> bool:
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_runs_on_cpu() -> bool:
    """Whether Triton launches may take CPU tensors: under the interpreter, or while
    bench/compile_plan.py records a GPU run's launches (CPU tensors stand in for the
    device's, nothing runs; grit_kernels.triton._common.PLANNED_SMS)."""
    if triton_interpret():
        return True
    if not has_triton():
        return False
    from .triton import _common

    return _common.PLANNED_SMS is not None


def forced() -> str | None:
    """The backend forced by ``GRIT_BACKEND``, or None. Invalid values are an error."""
    value = os.environ.get("GRIT_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(f"GRIT_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _unavailable_reason(backend: str, device_type: str, supported: tuple[str, ...]) -> str | None:
    if backend not in supported:
        return f"this op has no {backend} backend (it has {', '.join(supported)})"
    if backend == "cuda":
        if not has_C():
            return _load_C()
        if device_type not in ("cuda", "cpu"):
            return f"the cuda backend runs CUDA tensors (or CPU tensors through its host build), got {device_type}"
    elif backend == "triton":
        if not has_triton():
            return "triton is not installed"
        if device_type == "cpu" and not triton_runs_on_cpu():
            return "the triton backend runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cuda", "cpu"):
            return f"the triton backend runs CUDA tensors, got {device_type}"
    elif backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, got {device_type}"
    return None


def explain(op: str, device_type: str, supported: tuple[str, ...] = BACKENDS) -> tuple[str | None, str]:
    """(backend ``select`` would pick, why), or (None, the error it would raise): for
    ``python -m grit_kernels``. Nothing is compiled or launched."""
    want = forced()
    if want is not None:
        reason = _unavailable_reason(want, device_type, supported)
        if reason is not None:
            return None, f"GRIT_BACKEND={want} is unavailable: {reason}"
        return want, f"forced by GRIT_BACKEND={want}"
    if device_type == "cuda":
        why = []
        for candidate in ("cuda", "triton"):
            if candidate not in supported:
                continue
            reason = _unavailable_reason(candidate, device_type, supported)
            if reason is None:
                first = "the preferred kernel" if not why else "; ".join(why)
                return candidate, first
            why.append(f"not {candidate}: {reason}")
        return None, "; ".join(why) or "no GPU kernel for this op"
    if device_type == "cpu" and "cpu" in supported:
        return "cpu", "CPU tensors run PyTorch's fused CPU kernels / vectorised PyTorch"
    return None, f"no backend of this op runs {device_type} tensors (GRIT_BACKEND=reference runs the oracle)"


def select(op: str, device_type: str, supported: tuple[str, ...] = BACKENDS) -> str:
    """Pick the backend for one call of ``op`` on tensors of ``device_type``.

    Default: CUDA tensors go to ``cuda`` when ``_C`` is built and the op has it, else
    ``triton``; CPU tensors go to ``cpu``. ``GRIT_BACKEND`` overrides, and a forced backend
    that cannot run (or no backend at all) raises BackendUnavailableError naming the reason.
    """
    choice, why = explain(op, device_type, supported)
    if choice is None:
        raise BackendUnavailableError(f"{op}: {why}")
    return choice


class Table:
    """The backend modules of one op: ``grit_kernels.<backend>.<op>`` for each backend it has,
    imported on first use (a Triton module imports triton)."""

    def __init__(self, op: str, backends: tuple[str, ...]):
        self.op, self.backends = op, backends

    def __getitem__(self, backend: str):
        if backend not in self.backends:
            raise BackendUnavailableError(f"{self.op}: no {backend} backend (it has {', '.join(self.backends)})")
        return importlib.import_module(f"grit_kernels.{backend}.{self.op}")

    def pick(self, device_type: str):
        """(name, module) of the backend ``select`` picks for tensors on ``device_type``."""
        name = select(self.op, device_type, self.backends)
        return name, self[name]

    def select(self, device_type: str):
        """The module of the backend ``select`` picks for tensors on ``device_type``."""
        return self.pick(device_type)[1]
