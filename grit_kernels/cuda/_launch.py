"""Glue between torch tensors and the pointer-based entry points of ``grit_kernels._C``."""

from __future__ import annotations

import functools

import torch

# Must match grit::DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ptr(t: torch.Tensor | None) -> int:
    """Address of a contiguous tensor's data, 0 for None."""
    return 0 if t is None else t.data_ptr()


def stream(t: torch.Tensor) -> int:
    """Handle of the current CUDA stream of t's device (0 for CPU tensors)."""
    return torch.cuda.current_stream(t.device).cuda_stream if t.is_cuda else 0


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def vec_width(t: torch.Tensor, last_dim: int) -> int:
    """Elements per 16-byte access if the last dim and the base address allow it, else 1."""
    vec = 16 // t.element_size()
    return vec if last_dim % vec == 0 and t.data_ptr() % 16 == 0 else 1
