"""What every Triton kernel file of grit_kernels shares: constants, the precision idiom, the
attention mask and ranges, the online-softmax step, and the one interpreter workaround.

House style (all kernel files):
* Pointers are ``<name>_ptr`` or an upper-case tensor name (Q, K, V); strides
  ``stride_<tensor><dim>``; constexpr flags upper case, passed by keyword at call sites.
* Dots take ``PREC: tl.constexpr`` as ``input_precision``: "ieee" for fp32 inputs (fp32 stays
  fp32, the tests' dtype), "tf32" otherwise (ignored by fp16/bf16 dots). ``precision()``
  picks it on the host.
* Ints that change from call to call (lengths, counts, window sizes, autotune keys) are
  listed in ``do_not_specialize``: Triton would otherwise compile a new variant whenever one
  of them becomes 1 or a multiple of 16 (a new sequence length in a test or a decode step).
  (Strides that are lengths, as the padded lse's, count as lengths.)
  Other strides, head dims and widths stay specialised: their divisibility is what makes the
  loads vector loads, and they change only with the model.
* Softmax is computed in base 2: scores are scaled by ``softmax_scale * LOG2E`` once and
  exponentiated with exp2; a natural-log lse is ``log2-sum * LN2``.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2): ln(x) = log2(x) * LN2


SHARED_BYTES = 232448  # shared memory one block may use on sm_90 (H100/H200): 227 KiB


# Set by bench/compile_plan.py, which drives the launchers with CPU tensors to record the
# kernels a GPU run will compile: the launchers then take their GPU branch (tile sizes, split
# counts) as on a device with this many SMs (132: H100 SXM, H200).
PLANNED_SMS: int | None = None


def on_gpu(t: torch.Tensor) -> bool:
    """Whether launches for ``t`` are compiled for a GPU (its device, or a planned run)."""
    return t.device.type == "cuda" or PLANNED_SMS is not None


def sm_count(device: torch.device) -> int:
    if PLANNED_SMS is not None:
        return PLANNED_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def autotune_enabled() -> bool:
    """GRIT_AUTOTUNE=0: every autotuned kernel runs the first config of its list (one compile
    per specialisation instead of one per config, and no benchmarking: GPU test runs)."""
    return os.environ.get("GRIT_AUTOTUNE", "1") not in ("0", "")


def kv_tiles_fit(block_m: int, block_n: int, block_d: int, stages: int, elem_bytes: int) -> bool:
    """Whether a K/V-streaming config fits shared memory: the pipeliner keeps ``stages - 1``
    K and V tiles in flight next to the Q tile (checked against ptxas' numbers by the sm_90
    compile tests). Configs that do not fit are dropped before anything is compiled."""
    kv = max(stages - 1, 1) * 2 * block_n * block_d * elem_bytes
    return kv + block_m * block_d * elem_bytes <= SHARED_BYTES


def precision(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    """The ``PREC`` constexpr for inputs of ``dtype``: fp32 dots stay fp32 unless allowed tf32."""
    return "tf32" if dtype != torch.float32 or allow_tf32 else "ieee"


@triton.jit
def splat(x, BLOCK: tl.constexpr):
    """A scalar broadcast to a (BLOCK,) tensor of its type. The interpreter rejects a scalar
    term inside a load/store mask (the compiler broadcasts it); masks built from scalars go
    through here, the one place that works around it."""
    return tl.zeros((BLOCK,), x.dtype) + x


@triton.jit
def key_range(first_row, last_row, shift, k_len, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Keys [lo, hi) that queries first_row..last_row may see: query i sees key j iff
    i + shift - left <= j <= i + shift + right and 0 <= j < k_len (shift = k_len - q_len,
    the bottom-right aligned diagonal; a side without HAS_* is unbounded). Swapping the rows
    (first_row = the last one) gives the keys that every one of them sees."""
    lo = first_row * 0
    hi = k_len
    if HAS_LEFT:
        lo = tl.maximum(first_row + shift - left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(last_row + shift + right + 1, 0), k_len)
    return lo, hi


@triton.jit
def window_mask(ok, offs_m, offs_n, shift, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """``ok`` (BLOCK_M, BLOCK_N) and the window's sides: query offs_m sees key offs_n iff
    offs_m + shift - left <= offs_n <= offs_m + shift + right (grit_kernels/_mask.py's rule)."""
    if HAS_RIGHT:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + shift + right)
    if HAS_LEFT:
        ok = ok & (offs_n[None, :] >= offs_m[:, None] + shift - left)
    return ok


@triton.jit
def visible(offs_m, offs_n, q_len, k_len, left, right, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: query offs_m (of q_len) sees key offs_n (of k_len)."""
    ok = (offs_n[None, :] < k_len) & (offs_m[:, None] < q_len)
    return window_mask(ok, offs_m, offs_n, k_len - q_len, left, right, HAS_LEFT=HAS_LEFT, HAS_RIGHT=HAS_RIGHT)


@triton.jit
def softmax_step(m_i, l_i, s, MAY_BE_EMPTY: tl.constexpr):
    """One online-softmax update with a tile of base-2 scores s (BLOCK_M, BLOCK_N):
    -> (p = exp2(s - m), alpha = the factor that rescales what was accumulated, new m, new l).

    With MAY_BE_EMPTY (masked tiles) a row that has seen no key yet keeps m = -inf; 0 is
    subtracted instead, so p = 0 and alpha = 1 rather than exp2(-inf - -inf) = NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)
