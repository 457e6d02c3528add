"""Builds grit_kernels (+ grit_models from models/) and, where nvcc is present, the pybind11
module grit_kernels._C from csrc/ through CMake (CMakeLists.txt holds sources and flags).

Environment:
  GRIT_CUDA_ARCHS       SM targets, default "80;90"
  GRIT_SKIP_CUDA_BUILD  1 skips the extension (pure Python/Triton install)
  GRIT_BUILD_JOBS       parallel compile jobs (default: CPU count)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    for candidate in (
        os.environ.get("CUDACXX"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def cuda_skip_reason():
    if os.environ.get("GRIT_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "GRIT_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc was not found (PATH, CUDACXX, CUDA_HOME)"
    return None


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("GRIT_CUDA_ARCHS", "80;90")
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGRIT_CUDA_ARCHS={archs}",
            f"-DGRIT_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("GRIT_BUILD_JOBS", str(os.cpu_count() or 1))
        # A cache from an earlier build names the cmake/ninja of that build's isolated
        # environment, which pip has deleted since: configure from scratch (what cmake
        # --fresh does, for any cmake version), so a second `pip install .` / `pip wheel .`
        # from the same checkout works. Object files stay, so ninja rebuilds only what changed.
        (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])


class BuildPy(build_py):
    """Says once per build (not once per setup.py hook) whether _C is built."""

    def run(self):
        if skip_reason:
            print(f"grit-kernels: not building grit_kernels._C because {skip_reason}; installing the "
                  "Python/Triton package only (python -m grit_kernels shows this later too)", file=sys.stderr)
        super().run()


skip_reason = cuda_skip_reason()

setup(
    name="grit-kernels",
    version="0.1.0",
    description="Fused CUDA C++ and Triton kernels and a minimal Mistral/Mixtral for GRIT models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    keywords=["flash-attention", "triton", "cuda", "embeddings", "gritlm", "mixtral", "mistral"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["grit_kernels", "grit_kernels.*"]) + ["grit_models", "grit_models.training"],
    package_dir={"grit_models": "models"},
    package_data={"grit_models": ["data/*.jsonl"]},  # the sample training data
    ext_modules=[] if skip_reason else [CMakeExtension("grit_kernels._C")],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.44",  # the checkpoint's tokenizer (AutoTokenizer), as gritlm
        "tqdm>=4.66",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "transformers>=5.0",
            "sentencepiece>=0.2",  # converts Mistral-7B's tokenizer.model for the tokenizer tests
            "protobuf>=4",         # (transformers reads the sentencepiece model through it)
            "scipy>=1.10",         # gritlm's README example (cosine similarity)
            "pandas>=2.0",         # encode() of a pandas Series
            "mteb>=2.0",           # tests/test_mteb.py: GritMTEB against mteb's gritlm-based wrapper
            # The compiler whose sm_90 register/spill numbers tests/aot_sm90.json records.
            "triton==3.9.0; platform_system == 'Linux'",
        ],
        # gritlm (a baseline and test oracle) is installed separately with --no-deps: its
        # declared extras (mteb, datasets, wandb, accelerate) are not needed to import it.
        # grit_models.mteb.GritMTEB: mteb's encoder protocol (tests/test_mteb.py runs its mock tasks).
        "mteb": ["mteb>=2.0"],
        "bench": ["matplotlib>=3.7", "transformers>=5.0", "cuda-python>=12.4; platform_system == 'Linux'"],
    },
    zip_safe=False,
)
