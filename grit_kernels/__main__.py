"""python -m grit_kernels: the environment report to paste into a bug report.

Versions (Python, torch, triton, CUDA, driver, the libraries grit_models uses), the device
and its roofline, whether grit_kernels._C was built and for which GPU architectures (or why
not), and which backend each op picks for CPU and for CUDA tensors, with the reason.
Nothing is compiled or launched.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys

# Each op's backends, as its module in grit_kernels/ops lists them.
OPS = {
    "mean_pool": ("grit_kernels.ops.mean_pool", "mean_pool"),
    "attention": ("grit_kernels.ops.attention", "attention"),
    "attention_with_kvcache": ("grit_kernels.ops.attention_kvcache", "attention_with_kvcache"),
    "contrastive_loss": ("grit_kernels.ops.contrastive_loss", "contrastive_loss"),
    "moe_route / moe_experts": ("grit_kernels.ops.moe", "moe"),
}


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "none found (no nvidia-smi)"


def build_info() -> dict:
    """Whether grit_kernels._C was built and for what (the module says itself), or why not."""
    import shutil

    from . import _backend

    if _backend.has_C():
        C = _backend.C()
        return {"C_extension": "built", "cuda_archs": getattr(C, "cuda_archs", "unknown"),
                "nvcc": getattr(C, "nvcc_version", "unknown"), "path": C.__file__}
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    why = ("GRIT_SKIP_CUDA_BUILD was set" if os.environ.get("GRIT_SKIP_CUDA_BUILD", "0") not in ("", "0")
           else "nvcc was not found when it was installed" if nvcc is None
           else f"nvcc is at {nvcc} now; reinstall (pip install .) to build it")
    return {"C_extension": "not built", "reason": why, "import_error": _backend._load_C()}


def report() -> dict:
    import torch

    from . import _backend
    from ._device import roofline

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    out = {
        "grit-kernels": _version("grit-kernels"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "safetensors": _version("safetensors"),
        "tokenizers": _version("tokenizers"),
        "nvidia_driver": _driver() if cuda else "not queried (no CUDA device)",
        "cuda_devices": devices,
        "roofline": roofline("cuda" if cuda else "cpu"),
        "build": build_info(),
        "GRIT_BACKEND": os.environ.get("GRIT_BACKEND") or None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET") or None,
        "backends": {},
    }
    for op, (module, key) in OPS.items():
        supported = importlib.import_module(module).BACKENDS.backends
        row = {"has": list(supported)}
        for dev in ("cpu", "cuda"):
            try:
                picked, why = _backend.explain(key, dev, supported)
            except ValueError as e:  # a bad GRIT_BACKEND value
                picked, why = None, str(e)
            row[dev] = {"backend": picked, "why": why}
        out["backends"][op] = row
    return out


def _print(r: dict) -> None:
    print("grit-kernels environment")
    for key in ("grit-kernels", "python", "platform", "cpu_count", "torch", "torch_threads", "torch_cuda", "triton",
                "transformers", "safetensors", "tokenizers", "nvidia_driver", "GRIT_BACKEND", "TRITON_INTERPRET"):
        print(f"  {key:<17} {r[key]}")
    print(f"  {'cuda_devices':<17} {', '.join(r['cuda_devices']) or 'none'}")
    roof = r["roofline"]
    if roof["flops"]:
        print(f"  {'roofline':<17} {roof['name']}: {roof['flops'] / 1e12:.0f} TFLOP/s bf16, "
              f"{roof['bandwidth'] / 1e9:.0f} GB/s ({roof['source']})")
    else:
        print(f"  {'roofline':<17} {roof['source']}")
    b = r["build"]
    if b["C_extension"] == "built":
        print(f"  {'_C':<17} built for sm {b['cuda_archs']} with nvcc {b['nvcc']} ({b['path']})")
    else:
        print(f"  {'_C':<17} not built: {b['reason']} ({b['import_error']}); the cuda backend is "
              "unavailable, CUDA tensors go to triton")
    print("backends (what each op picks, and why):")
    for op, row in r["backends"].items():
        print(f"  {op}  [has {', '.join(row['has'])}]")
        for dev in ("cpu", "cuda"):
            print(f"    {dev:<5} -> {row[dev]['backend'] or 'error'}: {row[dev]['why']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m grit_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    args = p.parse_args(argv)
    r = report()
    if args.json:
        print(json.dumps(r, indent=1, default=str))
    else:
        _print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
