#!/usr/bin/env bash
# The wheels bench/gpu_check.sh --wheels DIR installs on a GPU machine without a package
# registry: pybind11, cmake and ninja (the _C build runs with --no-build-isolation), gritlm
# (a test oracle and the bench's baseline) and mistral-common (only read by the tests for
# Mistral-7B's tokenizer.model; never installed). For Python 3.12 on x86_64 Linux.
#
# usage: bench/gpu_wheels.sh DIR
set -euo pipefail
DIR=${1:?usage: bench/gpu_wheels.sh DIR}
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DIR" pybind11 'cmake>=3.26' ninja gritlm mistral-common==1.13.1
ls -1 "$DIR"
