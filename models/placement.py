"""``device_map`` / ``max_memory``: which device each part of the model lives on, as
transformers + accelerate spell it, placing whole decoder layers (a layer is never split).

    plan(cfg, device_map, max_memory=None, dtype=torch.bfloat16, with_lm_head=True)
        -> {"embed": dev, "layers.0": dev, ..., "norm": dev, "lm_head": dev}

``device_map``: "auto" or "balanced" (the layers spread evenly over the GPUs, as accelerate's
balanced map), "sequential" (GPU 0 filled up to its ``max_memory``, then GPU 1, ...), a
device ("cuda:1", 0, "cpu"), or a dict of HF module prefixes ("model.embed_tokens",
"model.layers.3", "model.norm", "lm_head", "model", "") to devices, which must cover every
module. ``max_memory``: {0: "40GiB", 1: 40e9, "cpu": "100GB"}; by default 90% of each visible
GPU's memory (room for activations and the KV cache), the CPU last and unbounded.
At run time activations move between devices at layer boundaries and each layer's KV
cache lives with the layer (``Transformer.forward``, ``KVCache``).
"""

from __future__ import annotations

import re

import torch

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value, name: str = "max_memory") -> int:
    """``10GB``, ``"500MiB"``, ``4e9`` or an int -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: expected a size like '40GiB' or a number of bytes, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{name}: expected a size >= 0, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = (m.group(2) or "b").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{name}: expected a size like '40GiB', '500MB' or a number of bytes, got {value!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def _device(value, name: str) -> torch.device:
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if value == "disk":
        raise ValueError(f"{name}: 'disk' offload is not supported; give every module a GPU or the CPU")
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {value!r} is not a device") from None


def module_sizes(cfg, dtype: torch.dtype, with_lm_head: bool = True) -> dict[str, int]:
    """Bytes of each placed module: "embed", "layers.i", "norm", "lm_head" (absent when tied)."""
    from .checkpoint import module_of, param_shapes

    elem = torch.empty((), dtype=dtype).element_size()
    sizes: dict[str, int] = {}
    for name, shape in param_shapes(cfg, with_lm_head).items():
        key = module_of(name)
        n = 1
        for d in shape:
            n *= d
        sizes[key] = sizes.get(key, 0) + n * elem
    return sizes


def _from_dict(device_map: dict, modules: list[str]) -> dict[str, torch.device]:
    """HF prefixes -> our modules (the longest matching prefix wins)."""
    ours = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
    out = {}
    for m in modules:
        hf = ours.get(m, "model." + m)
        best = None
        for prefix, dev in device_map.items():
            if not isinstance(prefix, str):
                raise ValueError(f"device_map: keys are module names like 'model.layers.0', got {prefix!r}")
            if prefix == "" or hf == prefix or hf.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[0]):
                    best = (prefix, dev)
        if best is None:
            raise ValueError(f"device_map: no entry places {hf!r} (give it, a prefix of it, or '' a device)")
        out[m] = _device(best[1], f"device_map[{best[0]!r}]")
    return out


def _default_memory() -> dict:
    if not torch.cuda.is_available():
        return {"cpu": None}
    mem = {i: int(0.9 * torch.cuda.get_device_properties(i).total_memory) for i in range(torch.cuda.device_count())}
    mem["cpu"] = None
    return mem


def plan(cfg, device_map, max_memory=None, dtype=torch.bfloat16, with_lm_head: bool = True) -> dict[str, torch.device]:
    """Each module's device (module docstring). Raises naming ``max_memory`` when the model
    does not fit the devices given."""
    sizes = module_sizes(cfg, dtype, with_lm_head)
    layers = [f"layers.{i}" for i in range(cfg.num_hidden_layers)]
    modules = ["embed", *layers, "norm"] + (["lm_head"] if "lm_head" in sizes else [])
    if isinstance(device_map, dict):
        return _from_dict(device_map, modules)
    if device_map not in ("auto", "balanced", "sequential"):
        dev = _device(device_map, "device_map")
        return {m: dev for m in modules}
    memory = dict(_default_memory() if max_memory is None else max_memory)
    budgets = []  # (device, bytes or None = unbounded), GPUs in index order, then the CPU
    for key in sorted((k for k in memory if k != "cpu"), key=lambda k: _device(k, "max_memory").index or 0):
        budgets.append((_device(key, f"max_memory[{key!r}]"), parse_bytes(memory[key], f"max_memory[{key!r}]")))
    if "cpu" in memory:
        cap = memory["cpu"]
        budgets.append((torch.device("cpu"), None if cap is None else parse_bytes(cap, "max_memory['cpu']")))
    if not budgets:
        raise ValueError("max_memory: no device to place the model on")
    # The pieces that travel together: the embedding with the first layer, the final norm
    # and the head with the last (no extra transfer at either end).
    groups = [[m] for m in layers]
    groups[0].insert(0, "embed")
    groups[-1] += ["norm"] + (["lm_head"] if "lm_head" in sizes else [])
    need = [sum(sizes[m] for m in g) for g in groups]
    gpus = [b for b in budgets if b[0].type == "cuda"]
    targets = [b[1] for b in budgets]
    if device_map in ("auto", "balanced") and len(gpus) > 1:
        # Even shares over the GPUs (never above what each may hold), the CPU after them.
        share = -(-sum(need) // len(gpus))
        targets = [min(share + max(need), cap) if dev.type == "cuda" else cap for dev, cap in budgets]
    out, d, used = {}, 0, 0
    for g, n in zip(groups, need):
        while targets[d] is not None and used + n > targets[d]:
            d, used = d + 1, 0
            if d == len(budgets):
                total = sum(need) / 2**30
                raise ValueError(f"max_memory: the model ({total:.1f} GiB in {dtype}) does not fit the devices "
                                 f"given ({', '.join(f'{dev}: {cap}' for dev, cap in budgets)}); give more memory, "
                                 "more devices or the CPU")
        for m in g:
            out[m] = budgets[d][0]
        used += n
    return out
