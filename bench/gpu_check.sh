#!/usr/bin/env bash
# Every GPU-side check in one go, sized for <= 8 minutes on an H100:
#   1. build grit_kernels._C for sm_90 with the machine's own torch/nvcc (no downloads),
#   2. run the tests marked `gpu` (Triton compiled for the device, not interpreted),
#   3. run `python -m bench` on the GPU,
# writing env.txt, build.log, gpu_tests.log, bench.log, results.json and results.png into
# RESULTS_DIR. Every op adds its GPU tests (marked `gpu`) and its bench suite, so nothing
# here changes per op.
#
# usage: bench/gpu_check.sh RESULTS_DIR [--quick]
set -uo pipefail
RESULTS_DIR=${1:?usage: bench/gpu_check.sh RESULTS_DIR [--quick]}
QUICK=${2:-}
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
status=0

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  nvcc --version | tail -2
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$RESULTS_DIR/env.txt" 2>&1
cat "$RESULTS_DIR/env.txt"

echo "== build _C for sm_90"
start=$(date +%s)
if ! GRIT_CUDA_ARCHS=90 GRIT_BUILD_JOBS=$(nproc) $PY -m pip install --no-build-isolation --no-deps -e . \
    > "$RESULTS_DIR/build.log" 2>&1; then
  echo "build FAILED"; tail -40 "$RESULTS_DIR/build.log"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

echo "== gpu tests"
start=$(date +%s)
GRIT_GPU_TESTS=1 timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$RESULTS_DIR/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu tests: $(( $(date +%s) - start )) s"

echo "== python -m bench"
start=$(date +%s)
timeout 300 $PY -m bench --out "$RESULTS_DIR" --budget 0.25 $QUICK 2>&1 | tee "$RESULTS_DIR/bench.log" | grep -v '%|'
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "bench: $(( $(date +%s) - start )) s"
exit $status
