#!/usr/bin/env bash
# Second call for a lent GPU (after bench/gpu_check.sh): the CUDA kernels of moga._C under compute-sanitizer.
#
#   GPU_CHECK_SKIP_BUILD=1 bash bench/gpu_sanitize.sh    # repo root, on the warm GPU machine that ran gpu_check.sh
#
# memcheck (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards) over the small CUDA tests:
# direct op calls on ragged / empty / singleton / repeated-token layouts, misaligned inputs, the sort and the gated
# un-permute. Sanitized runs are 10-100x slower, so only small shapes; each tool runs under `timeout` within
# SANITIZE_SECONDS (default 540). Logs and a summary land in $OUT (default bench/results/gpu_sanitize_<date>).
# compute-sanitizer works on the Firecracker GPU machines, not on gVisor ones ("Device not supported"): the summary
# then says so instead of failing. Without GPU_CHECK_SKIP_BUILD=1 the extension is built first (as gpu_check.sh does).
set -u -o pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-bench/results/gpu_sanitize_${STAMP}}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
BUDGET=${SANITIZE_SECONDS:-540}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0a"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset TRITON_INTERPRET

SANITIZER=$(command -v compute-sanitizer || ls "$CUDA_HOME"/compute-sanitizer/compute-sanitizer "$CUDA_HOME"/bin/compute-sanitizer 2>/dev/null | head -1)
echo "gpu_sanitize $STAMP, budget ${BUDGET}s, sanitizer: ${SANITIZER:-not found}" | tee "$SUMMARY"
if [[ -z "$SANITIZER" ]]; then
  echo "compute-sanitizer not found: nothing to do" | tee -a "$SUMMARY"
  exit 0
fi

if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  env MOGA_BUILD_CUDA=1 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1 ||
    env MOGA_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
fi
if ! "$PYTHON" -c "import moga._C" 2>/dev/null; then
  # gpu_check.sh's fallback: an in-place build imported through python/ with a link python/moga/kernels -> kernels.
  [[ -e python/moga/kernels ]] || { ln -s ../../kernels python/moga/kernels && trap 'rm -f python/moga/kernels' EXIT; }
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
fi

# The small CUDA tests (names in tests/test_cuda_backend.py).
SELECT="test_ops_write_every_element or test_strided_and_misaligned_qkv or test_bwd_misaligned_dout \
or test_ops_asymmetric_segments_repeated_tokens or (test_sort_by_segment_matches_stable_sort and 1000) \
or (test_gated_unpermute_cuda_matches_float64 and 1000)"

# run TOOL CAP EXTRA...: one sanitizer pass over the selected tests; records rc, errors reported and duration.
run() {
  local tool=$1 cap=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s) - 10))
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    printf '%-10s skipped (no time left)\n' "$tool" | tee -a "$SUMMARY"
    return 0
  fi
  local log="$OUT/$tool.log" t0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$SANITIZER" --tool "$tool" --print-limit 20 --error-exitcode 99 "$@" \
    "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_cuda_backend.py -k "$SELECT" >"$log" 2>&1
  local rc=$?
  local errors
  errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+ error' "$log" | tail -1)
  local note=""
  ((rc == 124 || rc == 137)) && note=" (timed out)"
  ((rc == 99)) && note=" (sanitizer found errors)"
  grep -q "Device not supported" "$log" && note=" (device not supported: gVisor machine)"
  printf '%-10s rc=%-3s %4ss %s%s\n' "$tool" "$rc" "$(($(date +%s) - t0))" "${errors:-no summary}" "$note" |
    tee -a "$SUMMARY"
  tail -3 "$log" | tee -a "$SUMMARY"
}

run memcheck 300
run racecheck 220 --racecheck-report hazard
echo "total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
