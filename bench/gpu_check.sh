#!/usr/bin/env bash
# One command for a lent GPU: build, GPU tests, matmul/copy ceilings, moga bench, all inside one 10-minute call.
#
#   bash bench/gpu_check.sh            # from the repository root, on the GPU machine
#
# The GPU machine has python3 3.12 with torch 2.11, triton 3.6, nvcc 13.0, ninja, pybind11 and pytest, no venv
# and no network. Everything lands in $OUT (default bench/results/gpu_<date>): env.txt (device, nvidia-smi,
# versions), gpu_check.log (every step's output), pytest.log, ceiling.json, bench.json, bench.png and summary.txt
# (each step's exit code and duration). Each step runs under `timeout`, capped by what is left of the overall
# budget (GPU_CHECK_SECONDS, default 570), so a hang cannot eat the call and later steps still run.
#
# Knobs: PYTHON (default python3), GPU_CHECK_SECONDS, GPU_CHECK_SKIP_BUILD=1 (use an existing build),
# BENCH_ARGS (extra arguments for moga bench), MAX_JOBS (parallel compiles, default: all cores).
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-bench/results/gpu_${STAMP}}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
BUDGET=${GPU_CHECK_SECONDS:-570}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # real kernels on the real GPU

: >"$LOG"
echo "gpu_check $STAMP, budget ${BUDGET}s" >"$SUMMARY"

# step NAME CAP_SECONDS COMMAND...: run under timeout min(CAP, time left - 15 s); log and record rc + duration.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s) - 15))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    printf '%-10s skipped (no time left)\n' "$name" | tee -a "$SUMMARY"
    return 0
  fi
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  local note=""
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  printf '%-10s rc=%-3s %4ss%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$note" | tee -a "$SUMMARY" "$LOG"
  return 0
}

# 1. Where are we: device, driver, versions.
{
  echo "date_utc: $(date -u +%FT%TZ)"
  echo "host: $(hostname)"
  "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__); print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')" 2>&1
  nvcc --version 2>&1 | tail -1
  nvidia-smi 2>&1
} >"$OUT/env.txt"
head -4 "$OUT/env.txt" | tee -a "$SUMMARY"

# 2. Build the extension with this machine's python3. An editable install maps moga.kernels onto kernels/;
#    where pip cannot (offline build backend missing), build in place and point PYTHONPATH at python/ with
#    a temporary link python/moga/kernels -> kernels (removed on exit).
#    (step runs its command under `timeout`, which cannot run shell functions: plain commands only.)
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  step install 300 env MOGA_BUILD_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
  if ! "$PYTHON" -c "import moga.kernels, moga._C" >>"$LOG" 2>&1; then
    step build 300 env MOGA_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace
    if [[ ! -e python/moga/kernels ]]; then
      ln -s ../../kernels python/moga/kernels
      trap 'rm -f python/moga/kernels' EXIT
    fi
    export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
"$PYTHON" -c "import moga; print('import moga:', moga.__file__, 'backends:', moga.available_backends())" 2>&1 |
  tee -a "$SUMMARY" "$LOG"

# 3. Ceilings first (seconds): every later figure is read against them.
step ceiling 60 "$PYTHON" -m moga.bench.ceiling --json "$OUT/ceiling.json"

# 4. GPU tests: the Triton / CUDA kernel tests and the optional backends, bf16 included.
mapfile -t TESTS < <(ls tests/test_*triton*.py tests/test_*cuda*.py tests/test_optional_backends.py 2>/dev/null)
if ((${#TESTS[@]})); then
  step pytest 180 bash -c "set -o pipefail; $PYTHON -m pytest -q -ra -m 'gpu or not slow' ${TESTS[*]} 2>&1 | tee '$OUT/pytest.log'"
  { tail -3 "$OUT/pytest.log" 2>/dev/null; echo; } | tee -a "$SUMMARY"
else
  echo "pytest     no triton/cuda test files found" | tee -a "$SUMMARY"
fi

# 5. moga bench, GPU sweep trimmed to fit: N from 8K to 580,000, M=8, balanced and Zipf. bench.json is
#    rewritten after every case, so a sweep cut short still returns what it measured.
# shellcheck disable=SC2086
step bench 600 "$PYTHON" -m moga.bench --device cuda --n 8192 32768 131072 580000 --m 8 \
  --time-limit 4 --budget 0.5 --json "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-}
sed -n '/^=== bench/,$p' "$LOG" | grep -v 'sweep:' | tail -150 >>"$SUMMARY"

echo "total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
cat "$SUMMARY"
