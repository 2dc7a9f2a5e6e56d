#!/usr/bin/env bash
# Optional second call for a lent GPU (after bench/gpu_check.sh, whose own memcheck step covers only two small tests):
# the CUDA kernels of moga._C under compute-sanitizer, ~300 s, so that it fits after gpu_check.sh (~420 s) and the
# machine's start in a session's 15 device-minutes.
#
#   GPU_CHECK_SKIP_BUILD=1 bash bench/gpu_sanitize.sh    # repo root, on the warm GPU machine that ran gpu_check.sh
#
# memcheck (out-of-bounds and misaligned accesses) and racecheck (shared-memory hazards) over the small CUDA tests:
# direct op calls on ragged / empty / singleton / repeated-token layouts, misaligned inputs, the sort and the gated
# un-permute. Sanitized runs are 10-100x slower, so only small shapes; each tool runs under `timeout` within
# SANITIZE_SECONDS (default 300: memcheck 160 s, racecheck the rest). Logs and a summary land in $OUT (default
# bench/results/gpu_sanitize_<date>). PyTorch's caching allocator is off (PYTORCH_NO_CUDA_MEMORY_CACHING=1) so that
# memcheck sees each buffer's own bounds; pytest runs with -v, so a run cut short still names the tests it reached.
# compute-sanitizer works on the Firecracker GPU machines, not on gVisor ones ("Device not supported"): the summary
# then says so instead of failing. Without GPU_CHECK_SKIP_BUILD=1 the extension is built first (as gpu_check.sh does:
# in place, for the device's own architecture).
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2

PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-bench/results/gpu_sanitize_${STAMP}}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
BUDGET=${SANITIZE_SECONDS:-300}
# As gpu_check.sh (bench/gpu_env.sh): CUDA_HOME, MAX_JOBS, PYTHONUNBUFFERED=1, no TRITON_INTERPRET, the build for
# the device's own architecture (or GPU_CHECK_ARCH).
source bench/gpu_env.sh || exit 2
gpu_arch_list
export PYTORCH_NO_CUDA_MEMORY_CACHING=1

SANITIZER=$(find_sanitizer)
echo "gpu_sanitize $STAMP, budget ${BUDGET}s, sanitizer: ${SANITIZER:-not found}" | tee "$SUMMARY"
if [[ -z "$SANITIZER" ]]; then
  echo "compute-sanitizer not found: nothing to do" | tee -a "$SUMMARY"
  exit 0
fi

# As gpu_check.sh: moga imported from python/ (the in-place build), the Triton kernels linked in as moga.kernels.
use_source_tree
link_kernels
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" != 1 ]]; then
  timeout 120 env MOGA_BUILD_CUDA=1 "$PYTHON" setup.py build_ext --inplace >"$OUT/build.log" 2>&1
  echo "build rc=$? ($(($(date +%s) - START))s, arch $TORCH_CUDA_ARCH_LIST)" | tee -a "$SUMMARY"
fi
"$PYTHON" -c "import moga._C; print('moga._C:', moga._C.__file__)" 2>&1 | tail -1 | tee -a "$SUMMARY"

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
    "$PYTHON" -m pytest -v -p no:cacheprovider tests/test_cuda_backend.py -k "$SELECT" >"$log" 2>&1
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

run memcheck 160
run racecheck 160 --racecheck-report hazard
echo "total $(($(date +%s) - START))s" | tee -a "$SUMMARY"
