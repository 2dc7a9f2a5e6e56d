# Sourced, from the repository root, by bench/gpu_check.sh and bench/gpu_sanitize.sh: the environment both set up on
# a lent GPU machine (its own python3, no install, nothing outside reachable: no network or pip step here).
#
# On sourcing: CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default all cores) and PYTHONUNBUFFERED=1 are exported,
# TRITON_INTERPRET is unset (real kernels on the real GPU). Functions, for the scripts to call where they need them:
#
#   gpu_compute_cap       prints the device's compute capability from nvidia-smi ("9.0"; empty when there is none)
#   gpu_arch_list [CC]    sets and exports TORCH_CUDA_ARCH_LIST: GPU_CHECK_ARCH when set, else the architecture of
#                         compute capability CC (queried with gpu_compute_cap when not given); an inherited list (e.g.
#                         an image's list of many) is replaced
#   find_sanitizer        prints the path of compute-sanitizer (PATH, then under CUDA_HOME; empty when not found)
#   use_source_tree       exports PYTHONPATH with python/ first: moga imported from this tree (the in-place build)
#   link_kernels          links the Triton kernels in as moga.kernels (setup.py maps kernels/ there when installing)
#                         unless something is there already; the link goes again on exit (an EXIT trap)

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

gpu_compute_cap() {
  timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' \r'
}

gpu_arch_list() {
  if [[ -n "${GPU_CHECK_ARCH:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$GPU_CHECK_ARCH
  else
    local cc
    if (($#)); then cc=$1; else cc=$(gpu_compute_cap); fi
    case "$cc" in
      9.0) TORCH_CUDA_ARCH_LIST=9.0a ;; # Hopper: wgmma / setmaxnreg need the sm_90a target
      [0-9].[0-9] | 1[0-9].[0-9]) TORCH_CUDA_ARCH_LIST=$cc ;;
      *) TORCH_CUDA_ARCH_LIST="8.0;9.0a" ;; # unknown device: setup.py's default
    esac
  fi
  export TORCH_CUDA_ARCH_LIST
}

find_sanitizer() {
  command -v compute-sanitizer ||
    ls "$CUDA_HOME"/bin/compute-sanitizer "$CUDA_HOME"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1
}

use_source_tree() {
  export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
}

link_kernels() {
  if [[ ! -e python/moga/kernels ]]; then
    ln -s ../../kernels python/moga/kernels && trap 'rm -f python/moga/kernels' EXIT
  fi
}
