"""Input validation shared by the ops: every message names the argument and what was expected.

All checks run before any output is allocated or written, so a rejected call has no effect.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | tuple[int, ...] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> None:
    """Check that ``t`` is a tensor of the given rank, dtype, shape (None = any) and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name}: expected {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected dtype {_dtype_names(dtypes)}, got {str(t.dtype).replace('torch.', '')}")
    if shape is not None:
        if t.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if w is None else str(w) for w in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (like the other inputs), got {t.device}")


def check_same_device(**tensors) -> torch.device:
    """All non-None tensors on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name}: expected a tensor on {first} like {first_name}, got {dev} (CPU/GPU mix)")
    return first


def check_mask_args(causal, window, softmax_scale) -> tuple[int, int]:
    """causal (bool), window ((left, right) ints >= -1) and softmax_scale (None or a finite
    number > 0) of the attention ops -> (left, right) with right = 0 under causal.

    A scale of 0 or below is rejected rather than computed: 0 makes every logit 0 and the
    fused CPU kernel then produces NaN for causal rows, a negative one inverts the softmax.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    if not (isinstance(window, (tuple, list)) and len(window) == 2
            and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window: expected a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window: expected values >= -1 (-1 = unbounded), got {tuple(window)}")
    if softmax_scale is not None:
        if not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool):
            raise TypeError(f"softmax_scale: expected a float or None, got {type(softmax_scale).__name__}")
        if not (math.isfinite(softmax_scale) and softmax_scale > 0):
            raise ValueError(f"softmax_scale: expected a finite number > 0, got {softmax_scale}")
    return left, (0 if causal else right)


def check_no_overlap(**outputs) -> None:
    """Tensors written in place must not alias themselves (an expanded, stride-0 view writes
    several rows into one slot) or each other, as PyTorch's ``index_copy_`` requires."""
    written = []
    for name, t in outputs.items():
        if t is None or t.numel() == 0:
            continue
        # What torch's internal-overlap check calls certain: a dim of size > 1 with stride 0.
        # Read from shape and strides only, so that torch.compile traces it.
        if any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride())):
            raise ValueError(f"{name}: written in place but its elements overlap in memory "
                             f"(shape {tuple(t.shape)}, strides {t.stride()}: an expanded view?); "
                             "pass a tensor with its own storage, e.g. .contiguous()")
        if torch.compiler.is_compiling() or _is_fake(t):
            continue  # no data pointers while tracing
        written.append((name, t))
    for i, (n1, a) in enumerate(written):
        for n2, b in written[i + 1:]:
            if _share_elements(a, b):
                raise ValueError(f"{n2}: written in place but shares memory with {n1}; pass separate tensors")


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill [data_ptr, data_ptr + numel) exactly."""
    expected = 1
    for st, n in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if st != expected:
            return False
        expected *= n
    return True


def _share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors certainly share an element: the same view; two dense tensors
    whose byte ranges overlap (PyTorch's rule for in-place ops); or two views of one layout
    (same shape and strides, as slices of one buffer are) whose offset is reachable by a
    step inside the shape. K and V halves of one (B, S, 2, H, D) buffer interleave without
    sharing; caches shifted by one position do share. Other layouts are not judged."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.shape == b.shape:
        return True
    if _dense(a) and _dense(b):
        a0, b0 = a.data_ptr(), b.data_ptr()
        return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()
    if a.stride() != b.stride() or a.shape != b.shape or a.element_size() != b.element_size():
        return False
    delta, rem = divmod(abs(a.data_ptr() - b.data_ptr()), a.element_size())
    if rem:
        return True  # element boundaries misaligned within one storage: bytes overlap
    dims = sorted((st, n) for n, st in zip(a.shape, a.stride()) if n > 1)
    reach = 0
    for st, n in dims:  # nested strides: each one steps past everything the smaller ones reach
        if st <= reach:
            return False
        reach += (n - 1) * st
    for st, n in reversed(dims):  # with nested strides the greedy decomposition is exact
        step = min(delta // st, n - 1)
        delta -= step * st
    return delta == 0


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int, device: torch.device) -> torch.Tensor | None:
    """cu_seqlens: 1-D int32, starts at 0, non-decreasing, last entry == total tokens (every
    packed token belongs to a sequence: attention and mean_pool agree on this).

    Reads the values (a host sync on CUDA tensors) and returns them as (B + 1,) int64 on the
    host, so that a caller needing them reads them once; None under torch.compile's fake
    tensors, where values cannot be read and the check is skipped.
    """
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.numel() < 1:
        raise ValueError(f"{name}: expected at least one entry (0), got an empty tensor")
    if _is_fake(cu):
        return None
    values = cu.detach().to("cpu", torch.int64)
    if int(values[0]) != 0:
        raise ValueError(f"{name}: expected the first entry to be 0, got {int(values[0])}")
    if values.numel() > 1 and bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"{name}: expected non-decreasing offsets, got {values.tolist()[:16]}")
    if int(values[-1]) != total:
        raise ValueError(f"{name}: last entry {int(values[-1])} must equal the {total} packed tokens")
    return values


# Values of CUDA tensors already checked: (weakref to the tensor, its version counter, what
# it was checked against) -> the result. A forward calls attention once per layer with the
# same, unmodified cu_seqlens: only the first call reads them (one device-to-host copy and
# sync per tensor instead of one per layer). In-place changes through torch bump the version.
_SEEN: dict[int, tuple] = {}
_SEEN_MAX = 16


def read_once(t: torch.Tensor, against, compute, *, cacheable: bool | None = None):
    """``compute()`` (which reads ``t``'s values), or its remembered result for this very
    tensor, unchanged since (same version counter) and checked against the same ``against``.

    Remembered only for CUDA tensors (``cacheable`` overrides, for tests): reading a CPU
    tensor costs no sync, and a change made through ``.numpy()`` must be seen. Inference
    tensors have no version counter, so they are read every time. While a CUDA graph is
    being captured nothing can be read: returns None (the kernels bound every access)."""
    if cacheable is None:
        cacheable = _cacheable(t)
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    if not cacheable:
        return compute()
    hit = _SEEN.get(id(t))
    if hit is not None and hit[0]() is t and hit[1] == t._version and hit[2] == against:
        return hit[3]
    result = compute()
    _remember(t, against, result)
    return result


def vouch(t: torch.Tensor, against, result, *, cacheable: bool | None = None) -> None:
    """What ``read_once(t, against, ...)`` would compute from ``t``'s current values, told by
    the caller that wrote them from values it holds on the host (a KV cache advancing its
    lengths): the next ``read_once`` of the unchanged tensor reads nothing. Only where
    ``read_once`` would remember (CUDA tensors; CPU ones are read anyway)."""
    if cacheable if cacheable is not None else _cacheable(t):
        _remember(t, against, result)


def _cacheable(t: torch.Tensor) -> bool:
    return t.is_cuda and not t.is_inference()


def _remember(t: torch.Tensor, against, result) -> None:
    import weakref

    if id(t) not in _SEEN and len(_SEEN) >= _SEEN_MAX:
        _SEEN.pop(next(iter(_SEEN)))
    _SEEN[id(t)] = (weakref.ref(t), t._version, against, result)


def longest_sequence(name: str, cu: torch.Tensor, total: int, device) -> int | None:
    """``check_cu_seqlens``, then the longest sequence (None when values cannot be read).
    What ``read_once`` remembers under ("cu_seqlens", total) for every op."""
    values = check_cu_seqlens(name, cu, total, device)
    if values is None:
        return None
    return int((values[1:] - values[:-1]).max()) if values.numel() > 1 else 0


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or t.device.type == "meta"
