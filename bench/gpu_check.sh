#!/usr/bin/env bash
# One call on a lent GPU (H100 / H200): build, ceilings, the HEADLINE bench first, the GPU tests, a short memcheck
# and a tile-configuration sweep, planned to fit ~420 s, so that a second call (bench/gpu_sanitize.sh, ~300 s) still
# fits in a session's 15 device-minutes with the machine's start.
#
#   bash bench/gpu_check.sh          # repository root of the GPU machine (its python3: torch 2.11, triton 3.6)
#
# Steps, in this order, each under `timeout` with its cap in seconds (the caps add up to the plan, 410 s, leaving
# 10 s of the 420 for kill grace). A step never runs past the planned end of the steps before it plus its own cap, so
# a hang cannot eat a later step's time; the steps marked * are elastic: they also get what earlier steps left unused.
#
#   env          15  device, driver, nvidia-smi, versions -> env.txt
#   build        75  moga._C in place (setup.py build_ext --inplace), MAX_JOBS = all cores, one architecture: the
#                    device's own (TORCH_CUDA_ARCH_LIST=9.0a on Hopper, read from nvidia-smi)
#   import       10  import moga from python/ (PYTHONPATH, link python/moga/kernels -> kernels), backends available
#   ceiling      20  bf16 matmul and device copy ceilings -> ceiling.json
#   bench       150  moga bench, HEADLINE case first: N = 580000 (then 131072 32768 8192 while the cap lasts), M = 8
#                    balanced, Hq = 40, D = 128, bf16 (the paper's shapes, python/moga/bench/cases.py); methods
#                    triton, varlen and the recipes (dense SDPA always; forward only at 580K under --time-limit 4);
#                    bench.json rewritten after every case
#   test_triton  50* Triton kernel tests: their own pytest process, -v (each name printed as it starts), per-test
#                    timeout (pytest-timeout when installed, else the step's timeout alone)
#   test_cuda    25* CUDA C++ backend, varlen and optional-backend tests: another process (an illegal address
#                    poisons only its own process's CUDA context)
#   test_large   20* tests/test_gpu_large.py: tensors of more than 2^31 elements, a process of its own
#   memcheck     20* compute-sanitizer memcheck of the small CUDA op tests (the long run: bench/gpu_sanitize.sh)
#   tile_sweep   20* bench/tile_sweep.py: fwd / dq / dk-dv, D 128 and 64, bf16 configs -> tile_sweep.json
#   report        5  the bench's and the sweep's figures, condensed into summary.txt
#
# $OUT (default bench/results/gpu_<UTC stamp>) receives at most 8 files (the device tool returns no more):
# summary.txt (the plan, then each step's rc, limit and duration as it ends, then the report), gpu_check.log (every
# step's full output, headed "=== step"), env.txt, ceiling.json, bench.json, bench.png, tile_sweep.json.
#
# Knobs: PYTHON (default python3); GPU_CHECK_SECONDS (overall limit, default the plan's sum); GPU_CHECK_CAP_<step>
# (e.g. GPU_CHECK_CAP_bench=200); GPU_CHECK_SKIP_BUILD=1 (use the build already there); GPU_CHECK_BENCH_ARGS (the
# bench's case arguments, replacing the default below); GPU_CHECK_TEST_TIMEOUT (per test, default 45 s); MAX_JOBS;
# GPU_CHECK_ARCH (the build's TORCH_CUDA_ARCH_LIST, default the device's own); GPU_CHECK_COMMIT (the commit to record, where the copy has no .git); GPU_CHECK_ONLY="step ..."
# (run only these steps, the others listed as skipped), e.g. a second call on the warm machine for more of the bench:
#   GPU_CHECK_SKIP_BUILD=1 GPU_CHECK_ONLY="env import bench report" GPU_CHECK_CAP_bench=300 \
#     GPU_CHECK_BENCH_ARGS="--n 131072 32768 8192 --m 8 --dist balanced zipf" bash bench/gpu_check.sh
#
# Dry run (GPU_CHECK_DRY_RUN=1, used by tests/test_gpu_check.py on a CPU machine): the env step runs (without the
# python probe; nvidia-smi may be a stand-in), every other step prints the command it would run instead of running
# it, under the same timeouts and bookkeeping. GPU_CHECK_DRY_FAIL="step:rc ..." and GPU_CHECK_DRY_HANG="step ..."
# make those steps exit with rc or hang, to exercise the accounting.
set -u -o pipefail
shopt -s nullglob
cd "$(dirname "$0")/.." || exit 2

export PYTHON=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
export OUT=${OUT:-bench/results/gpu_${STAMP}}
mkdir -p "$OUT"
export LOG="$OUT/gpu_check.log" SUMMARY="$OUT/summary.txt"
export DRY=${GPU_CHECK_DRY_RUN:-0}
START=$(date +%s)

# ---- the plan ---------------------------------------------------------------------------------------------------
STEPS=(env build import ceiling bench test_triton test_cuda test_large memcheck tile_sweep report)
declare -A CAP=([env]=15 [build]=75 [import]=10 [ceiling]=20 [bench]=150 [test_triton]=50 [test_cuda]=25
  [test_large]=20 [memcheck]=20 [tile_sweep]=20 [report]=5)
ELASTIC=" test_triton test_cuda test_large memcheck tile_sweep "
declare -A PLANNED_END
PLAN=0
PLAN_LINE=""
for s in "${STEPS[@]}"; do
  override="GPU_CHECK_CAP_$s"
  if [[ -n "${!override:-}" ]]; then CAP[$s]=${!override}; fi
  PLAN=$((PLAN + CAP[$s]))
  PLANNED_END[$s]=$PLAN
  PLAN_LINE+=" $s=${CAP[$s]}"
done
BUDGET=${GPU_CHECK_SECONDS:-$PLAN}
NEXT=0 # index in STEPS of the next step: steps run (or are skipped) in plan order, none left out

# ---- the machine --------------------------------------------------------------------------------------------------
# CUDA_HOME, MAX_JOBS, PYTHONUNBUFFERED=1, no TRITON_INTERPRET (real kernels on the real GPU), and the helpers below.
source bench/gpu_env.sh || exit 2
export CC_GPU
CC_GPU=$(gpu_compute_cap)
gpu_arch_list "$CC_GPU" # the device's own architecture only (GPU_CHECK_ARCH chooses another)
export SANITIZER
SANITIZER=$(find_sanitizer)
export TIMEOUT_NOTE
PER_TEST=${GPU_CHECK_TEST_TIMEOUT:-45}
PYTEST=("$PYTHON" -m pytest -v -p no:cacheprovider -rfE --tb=short -m "gpu or not slow")
if "$PYTHON" -c "import pytest_timeout" >/dev/null 2>&1; then
  PYTEST+=("--timeout=$PER_TEST")
  TIMEOUT_NOTE="pytest-timeout, ${PER_TEST} s per test"
else
  TIMEOUT_NOTE="pytest-timeout missing: per-process timeout only (the step's)"
fi

# Import moga from this tree without installing it: python/ on the path, the Triton kernels linked in as
# moga.kernels (setup.py maps kernels/ there when installing). The link goes again on exit.
use_source_tree
[[ $DRY == 1 ]] || link_kernels

# ---- bookkeeping ----------------------------------------------------------------------------------------------------
: >"$LOG"
{
  echo "gpu_check $STAMP$([[ $DRY == 1 ]] && echo ' (DRY RUN: commands echoed, not run)')"
  echo "plan:$PLAN_LINE total=$PLAN budget=$BUDGET"
  echo "tests: $TIMEOUT_NOTE; build arch: $TORCH_CUDA_ARCH_LIST (compute capability ${CC_GPU:-unknown})"
} | tee "$SUMMARY"

# record NAME LIMIT RC SECONDS NOTE: one summary line per step, written as the step ends.
record() {
  printf '%-12s cap=%-4s limit=%-4s rc=%-4s %4ss  %s\n' "$1" "${CAP[$1]}" "$2" "$3" "$4" "$5" | tee -a "$SUMMARY" "$LOG"
}

# advance NAME: the plan's next step must be NAME.
advance() {
  if [[ "${STEPS[$NEXT]:-}" != "$1" ]]; then
    echo "gpu_check: step '$1' out of plan order (next planned: '${STEPS[$NEXT]:-none}')" | tee -a "$SUMMARY" >&2
    exit 3
  fi
  NEXT=$((NEXT + 1))
}

# skip NAME REASON: a step that does not apply here (still listed, rc "-").
skip() {
  advance "$1"
  record "$1" 0 - 0 "skipped: $2"
}

dry_stub() {
  local name=$1
  shift
  echo "[dry run] $name would run: $*"
  local h f
  for h in ${GPU_CHECK_DRY_HANG:-}; do [[ $h == "$name" ]] && exec sleep 3600; done
  for f in ${GPU_CHECK_DRY_FAIL:-}; do [[ ${f%%:*} == "$name" ]] && exit "${f#*:}"; done
  exit 0
}
export -f dry_stub

# step NAME COMMAND...: run under timeout; output appended to gpu_check.log; rc and duration to summary.txt.
step() {
  local name=$1
  shift
  advance "$name"
  if [[ -n ${GPU_CHECK_ONLY:-} && " $GPU_CHECK_ONLY " != *" $name "* ]]; then
    record "$name" 0 - 0 "skipped: not in GPU_CHECK_ONLY"
    return 0
  fi
  local now limit planned_left budget_left
  now=$(date +%s)
  planned_left=$((START + PLANNED_END[$name] - now))
  budget_left=$((START + BUDGET - now))
  if [[ $ELASTIC == *" $name "* ]]; then
    limit=$planned_left
  else
    limit=$((CAP[$name] < planned_left ? CAP[$name] : planned_left))
  fi
  limit=$((limit < budget_left ? limit : budget_left))
  if ((limit < 3)); then
    record "$name" "$limit" - 0 "skipped: no time left"
    return 0
  fi
  export STEP_LIMIT=$limit
  local offset t0 rc note=""
  offset=$(stat -c %s "$LOG")
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  t0=$(date +%s)
  if [[ $DRY == 1 && $name != env ]]; then
    timeout --kill-after=5 "$limit" bash -c 'dry_stub "$@"' dry_stub "$name" "$@" >>"$LOG" 2>&1
  else
    timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  fi
  rc=$?
  if ((rc == 124 || rc == 137)); then
    note="TIMED OUT"
    local last
    last=$(tail -c +"$((offset + 1))" "$LOG" | grep -E '^tests/.*::' | tail -1 | cut -c1-150)
    [[ -n $last ]] && note+="; last test started: $last"
  fi
  if [[ $name == test_* || $name == memcheck ]]; then
    local tally
    tally=$(tail -c +"$((offset + 1))" "$LOG" | grep -E '(passed|failed|error|skipped|no tests ran).* in [0-9.]+s' |
      tail -1 | tr -d '=' | sed 's/^ *//')
    note="${note:+$note; }${tally:-no pytest tally}"
  fi
  if [[ $name == memcheck ]]; then
    local errors
    errors=$(tail -c +"$((offset + 1))" "$LOG" | grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' | tail -1)
    ((rc == 99)) && note="sanitizer found errors; $note"
    note="${errors:-no sanitizer summary}; $note"
  fi
  record "$name" "$limit" "$rc" "$(($(date +%s) - t0))" "$note"
  return 0
}

# ---- the steps ------------------------------------------------------------------------------------------------------
record_env() {
  {
    echo "date_utc: $(date -u +%FT%TZ)"
    echo "host: $(hostname) cores: $(nproc) memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
    echo "commit: ${GPU_CHECK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    echo "build arch list: $TORCH_CUDA_ARCH_LIST (compute capability ${CC_GPU:-unknown}); MAX_JOBS=$MAX_JOBS"
    echo "tests: $TIMEOUT_NOTE"
    if [[ $DRY == 1 ]]; then
      echo "python: [dry run] probe skipped"
    else
      "$PYTHON" -c "import sys, torch, triton
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, 'sm', f'{p.major}.{p.minor}', 'SMs', p.multi_processor_count, 'memory GiB', p.total_memory >> 30)
else:
    print('device: none (torch.cuda.is_available() is False)')" 2>&1
    fi
    echo "nvcc: $(nvcc --version 2>&1 | tail -1)"
    echo "compute-sanitizer: ${SANITIZER:-not found}"
    timeout 20 nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
    timeout 20 nvidia-smi 2>&1
  } >"$OUT/env.txt"
  head -12 "$OUT/env.txt"
}
export -f record_env

report() {
  "$PYTHON" - "$OUT" <<'EOF' 2>&1 | tee -a "$SUMMARY" "$REPORT_COPY"
import json, os, sys
out = sys.argv[1]
try:
    doc = json.load(open(os.path.join(out, "bench.json")))
    print("\nbench (ok rows):  N  method  mode  median_ms  TFLOP/s  %matmul  x_dense")
    for r in doc["results"]:
        if r["status"] == "ok":
            frac = f"{100 * r['fraction_of_matmul']:.0f}%" if r.get("fraction_of_matmul") else "-"
            dense = f"{r['speedup_vs_dense']:.2f}" if r.get("speedup_vs_dense") else "-"
            print(f"  {r['n']:>7} {r['method']:28s} {r['mode']:8s} {r['median_ms']:10.2f} {r['tflops']:7.1f} {frac:>5} {dense:>6}")
    # Speed against PyTorch's varlen_attn on the same segments (issue #12's yardstick): > 1 means faster.
    ok = {(r["n"], r["mode"], r["method"]): r["median_ms"] for r in doc["results"] if r["status"] == "ok"}
    print("\nx group_attention[varlen] (its median / this one's):  N  mode  method  ratio")
    for (n, mode, method), ms in sorted(ok.items()):
        base = ok.get((n, mode, "group_attention[varlen]"))
        if base and method != "group_attention[varlen]" and method.startswith(("group_attention", "recipe")):
            print(f"  {n:>7} {mode:8s} {method:28s} {base / ms:6.2f}")
    for r in doc["results"]:
        if r["status"] in ("error", "check_failed"):
            print(f"  {r['status'].upper()} {r['n']} {r['method']} {r['mode']}: {r['reason']}")
    for c in doc.get("check", []):
        if not c.get("ok", True):
            print(f"  CHECK FAILED: {c}")
except (OSError, ValueError, KeyError) as exc:
    print(f"\nbench.json: {type(exc).__name__}: {exc}")
try:
    doc = json.load(open(os.path.join(out, "tile_sweep.json")))
    print("\ntile sweep:  kernel  D  BM BN warps stages  source  status  median_ms  TFLOP/s  rel_diff")
    for r in doc["rows"]:
        c = r["config"]
        ms = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else (r.get("error") or "-")
        tf = f"{r['tflops']:.1f}" if r.get("tflops") is not None else "-"
        rel = f"{r['rel_diff_vs_production']:.1e}" if r.get("rel_diff_vs_production") is not None else "-"
        cfg = f"{c['block_m']:>3} {c['block_n']:>3} {c['num_warps']} {c['num_stages']}"
        print(f"  {r['kernel']:5s} {r['head_dim']:>3}  {cfg}  {r['source']:10s} {r['status']:8s} {ms} {tf} {rel}")
except (OSError, ValueError, KeyError) as exc:
    print(f"\ntile_sweep.json: {type(exc).__name__}: {exc}")
EOF
}
export -f report

step env bash -c record_env

if [[ ${GPU_CHECK_SKIP_BUILD:-0} == 1 ]]; then
  skip build "GPU_CHECK_SKIP_BUILD=1"
else
  step build env MOGA_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$MAX_JOBS" \
    CUDA_HOME="$CUDA_HOME" "$PYTHON" setup.py build_ext --inplace
fi

step import "$PYTHON" -c "import moga, moga.kernels
from moga.backends import get_backend
print('moga', moga.__file__, 'backends:', moga.available_backends())
try:
    import moga._C
    print('moga._C', moga._C.__file__)
except ImportError as exc:
    print('moga._C not importable:', exc)"

step ceiling "$PYTHON" -m moga.bench.ceiling --json "$OUT/ceiling.json"

# The headline first: N = 580,000 (M = 8 balanced; the sweep's Hq = 40, D = 128, bf16), then smaller N while the cap
# lasts. Forward only at 580K under --time-limit 4 (forward+backward there is estimated at ~10 s a call, and each
# timed figure costs ~5 calls). Methods: the triton and varlen backends and the recipes (sdpa, varlen), dense SDPA
# always; the cuda backend, the layer path and flex cost ~15 s each at 580K: GPU_CHECK_BENCH_ARGS for a second call.
# shellcheck disable=SC2206
BENCH_ARGS=(${GPU_CHECK_BENCH_ARGS:---n 580000 131072 32768 8192 --m 8 --dist balanced \
  --methods triton varlen recipe --time-limit 4 --budget 0.5})
step bench "$PYTHON" -m moga.bench --device cuda "${BENCH_ARGS[@]}" --json "$OUT/bench.json" --plot "$OUT/bench.png"

# tests NAME FILE...: one pytest process over the files that exist (a missing group is listed as skipped).
tests() {
  local name=$1 f files=()
  shift
  for f in "$@"; do [[ -f $f && " ${files[*]} " != *" $f "* ]] && files+=("$f"); done
  if ((${#files[@]})); then
    step "$name" "${PYTEST[@]}" "${files[@]}"
  else
    skip "$name" "no test files"
  fi
}
tests test_triton tests/test_triton_segment_attention.py tests/test_triton_tma.py tests/test_*triton*.py # core first
tests test_cuda tests/test_*cuda*.py tests/test_*varlen*.py tests/test_optional_backends.py
tests test_large tests/test_gpu_large.py

# The small CUDA op tests under memcheck (direct op calls on ragged / empty / singleton / repeated-token layouts).
# PyTorch's caching allocator is off so that memcheck sees each buffer's own bounds.
MEMCHECK_SELECT="test_ops_write_every_element or (test_ops_asymmetric_segments_repeated_tokens and 128)"
if [[ -n $SANITIZER || $DRY == 1 ]]; then
  step memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "${SANITIZER:-compute-sanitizer}" --tool memcheck \
    --error-exitcode 99 --print-limit 20 "${PYTEST[@]}" tests/test_cuda_backend.py -k "$MEMCHECK_SELECT"
else
  skip memcheck "compute-sanitizer not found"
fi

# The sweep stops starting new rows 5 s before its limit (STEP_LIMIT, set by step) and writes JSON after each row.
# shellcheck disable=SC2016  # expanded by the inner bash, after step sets STEP_LIMIT
step tile_sweep bash -c '"$PYTHON" bench/tile_sweep.py --json "$OUT/tile_sweep.json" --max-seconds $((STEP_LIMIT - 5))'

export REPORT_COPY="${TMPDIR:-/tmp}/gpu_check_report.$$"
step report bash -c report
[[ -f $REPORT_COPY ]] && cat "$REPORT_COPY" && rm -f "$REPORT_COPY" # the figures at the end of the call's output too

if ((NEXT != ${#STEPS[@]})); then
  echo "gpu_check: planned steps never reached: ${STEPS[*]:$NEXT}" | tee -a "$SUMMARY" >&2
fi
echo "total $(($(date +%s) - START))s of budget ${BUDGET}s" | tee -a "$SUMMARY"
