#!/usr/bin/env bash
# Every GPU-side check in one run that fits 7 minutes on one H200 (16 cores) and leaves useful
# results wherever it is cut. Phases run most valuable first, each under its own time limit,
# and each writes as it goes:
#
#   env       env.txt: card, driver, nvcc, Python / torch / triton / transformers versions
#   wheels    --wheels DIR (made by bench/gpu_wheels.sh): pip install --no-index the build
#             tools (pybind11, cmake, ninja) and gritlm;
#             GRIT_WHEELS=DIR also serves the tests' tokenizer wheel (mistral-common)
#   build     grit_kernels._C for sm_90 with the machine's torch and nvcc (build.log)
#   warm      python -m bench.compile_plan --compile: every Triton kernel the next phases
#             launch, compiled by a process pool into TRITON_CACHE_DIR (plan.jsonl: one line
#             per phase and op with its compile count and CPU seconds)
#   tests     the `gpu` tests, op by op (correctness of every op first), one config per kernel
#             (GRIT_AUTOTUNE=0), a per-test time limit (tests.jsonl: one line per test as it
#             ends, with the compiles the warm phase missed; gpu_tests.log ends in pytest's
#             summary even when the phase limit cuts it, by SIGINT)
#   headline  python -m bench --quick: every suite's headline rows (headline/results.json,
#             rewritten after every case)
#   sweeps    python -m bench: the full GPU sweeps (sweeps/results.json), until the limit
#
# phases.jsonl gets one line per phase as it ends (name, seconds, exit status). --dry-run
# runs every phase without touching a device: build compiles and links here, warm compiles
# for sm_90 with a stand-in driver (its plan.jsonl is the budget table's source), tests and
# bench only list what they would run.
#
# usage: bench/gpu_check.sh RESULTS_DIR [--dry-run] [--wheels DIR] [--total SECONDS]
set -uo pipefail
RESULTS_DIR=${1:?usage: bench/gpu_check.sh RESULTS_DIR [--dry-run] [--wheels DIR] [--total SECONDS]}
shift
DRY=0
WHEELS=""
TOTAL=420
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$(cd "${2:?--wheels needs a folder}" && pwd); shift ;;
    --total) TOTAL=${2:?--total needs seconds}; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$RESULTS_DIR"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$RESULTS_DIR/triton-cache}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # the same options in every process
[ -n "$WHEELS" ] && export GRIT_WHEELS=$WHEELS
NPROC=$(nproc)
START=$(date +%s)
status=0

# Seconds of the total each phase may use (what it does not use goes to the sweeps). A dry
# run on fewer cores than the GPU machine's 16 stretches the compile-bound limits to match.
LIMIT_BUILD=90 LIMIT_WARM=60 LIMIT_TESTS=150 LIMIT_TEST=30 LIMIT_HEADLINE=60
if [ $DRY -eq 1 ] && [ "$NPROC" -lt 16 ]; then
  SCALE=$(( (16 + NPROC - 1) / NPROC ))
  LIMIT_BUILD=$(( LIMIT_BUILD * SCALE )) LIMIT_WARM=$(( LIMIT_WARM * SCALE )) TOTAL=$(( TOTAL * SCALE ))
fi

left() { echo $(( TOTAL - ($(date +%s) - START) )); }

phase() {  # phase NAME LIMIT COMMAND...: run under a limit, log a line to phases.jsonl
  local name=$1 limit=$2; shift 2
  local budget
  budget=$(left)
  [ "$limit" -gt "$budget" ] && limit=$budget
  if [ "$limit" -le 0 ]; then
    echo "{\"phase\": \"$name\", \"seconds\": 0, \"status\": \"no time left\"}" >> "$RESULTS_DIR/phases.jsonl"
    echo "== $name: no time left"; return 0
  fi
  echo "== $name (limit ${limit} s)"
  local t0=$(date +%s)
  # SIGINT first (pytest and python -m bench print their summaries), SIGKILL 15 s later.
  timeout -s INT -k 15 "$limit" "$@"
  local rc=$?
  [ $rc -ne 0 ] && status=1
  echo "{\"phase\": \"$name\", \"seconds\": $(( $(date +%s) - t0 )), \"status\": $rc}" >> "$RESULTS_DIR/phases.jsonl"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s"
}

: > "$RESULTS_DIR/phases.jsonl"
{
  date -u
  echo "dry run: $DRY, cores: $NPROC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -2
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  $PY -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
  git log -1 --format='commit %H %s' 2>/dev/null
} > "$RESULTS_DIR/env.txt" 2>&1
cat "$RESULTS_DIR/env.txt"

if [ -n "$WHEELS" ]; then
  # Every wheel but mistral-common's (the tests read its tokenizer file; installed, it changes
  # how transformers loads Mistral tokenizers). bench/gpu_wheels.sh DIR downloads the set.
  phase wheels 60 bash -c "ls '$WHEELS'/*.whl | grep -v mistral_common | xargs $PY -m pip install --no-index \
    --no-deps --find-links '$WHEELS' > '$RESULTS_DIR/wheels.log' 2>&1 || { tail -20 '$RESULTS_DIR/wheels.log'; exit 1; }"
fi

phase build "$LIMIT_BUILD" bash -c "GRIT_CUDA_ARCHS=90 GRIT_BUILD_JOBS=$NPROC $PY -m pip install \
  --no-build-isolation --no-deps -e . > '$RESULTS_DIR/build.log' 2>&1 || { tail -40 '$RESULTS_DIR/build.log'; exit 1; }"

phase warm "$LIMIT_WARM" $PY -m bench.compile_plan --phase all --compile --workers "$NPROC" \
  --json "$RESULTS_DIR/plan.jsonl"

# Correctness of every op first, then the model-level tests.
TEST_FILES="tests/test_attention.py tests/test_attention_kvcache.py tests/test_mean_pool.py"
TEST_FILES+=" tests/test_contrastive_loss.py tests/test_moe.py tests/test_host_sync.py"
TEST_FILES+=" tests/test_model_backends.py tests/test_generation.py tests/test_grad_cache.py tests/test_training.py"
TEST_FILES+=" tests/test_dropin.py"
if [ $DRY -eq 1 ]; then
  phase tests "$LIMIT_TESTS" bash -c "$PY -m pytest -q -m gpu --collect-only $TEST_FILES -p no:cacheprovider \
    > '$RESULTS_DIR/gpu_tests.log' 2>&1; tail -3 '$RESULTS_DIR/gpu_tests.log'"
  for which in headline sweeps; do
    phase "$which" 30 $PY -m bench.compile_plan --phase "$which" --count --json "$RESULTS_DIR/bench_$which.jsonl"
  done
else
  : > "$RESULTS_DIR/tests.jsonl"
  phase tests "$LIMIT_TESTS" bash -c "GRIT_GPU_TESTS=1 GRIT_TEST_TIMEOUT=$LIMIT_TEST \
    GRIT_TEST_LOG='$RESULTS_DIR/tests.jsonl' $PY -m pytest -q -rfE -m gpu $TEST_FILES -p no:cacheprovider \
    --junitxml='$RESULTS_DIR/gpu_tests.xml' 2>&1 | tee -i '$RESULTS_DIR/gpu_tests.log' | tail -40; exit \${PIPESTATUS[0]}"
  phase headline "$LIMIT_HEADLINE" bash -c "$PY -m bench --quick --budget 0.25 --out '$RESULTS_DIR/headline' 2>&1 \
    | tee -i '$RESULTS_DIR/headline.log'; exit \${PIPESTATUS[0]}"
  phase sweeps "$(left)" bash -c "$PY -m bench --budget 0.25 --out '$RESULTS_DIR/sweeps' 2>&1 \
    | tee -i '$RESULTS_DIR/sweeps.log'; exit \${PIPESTATUS[0]}"
fi
echo "total: $(( $(date +%s) - START )) s of $TOTAL; phases: $RESULTS_DIR/phases.jsonl"
exit $status
