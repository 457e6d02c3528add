"""The device a run is on and its roofline (peak dense bf16 FLOP/s, memory bandwidth), for
the benchmarks' "% of roofline" and ``python -m grit_kernels``.

Queried from the driver through cuda-python where it is installed, else the datasheet.
"""

from __future__ import annotations

import functools

import torch

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
