"""Microbenchmark of the compiled "cpu" backend against dense SDPA and the naive per-group recipe.

Default problem (the CPU performance target): fp32, B=1, H=4, D=64, N=16384, M=8 balanced groups (random
assignment). Reports the median wall time of --repeats rounds after one warm-up, for the forward and for
forward+backward, GFLOP/s on the work each implementation does (moga.bench.flops), and the speed-up of the cpu
backend over each baseline. Each round runs every implementation once, so on a shared machine they all see similar
background load; the min/max spread and the median process CPU time (all threads) are printed beside the median.

    python bench/bench_cpu_segment_attention.py [--n 16384] [--heads 4] [--dim 64] [--groups 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import moga
from moga.backends import cpu_backend as cpu_backend_module
from moga.bench import baselines
from moga.bench.flops import dense_attention_flops, group_attention_flops


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, M: int) -> torch.Tensor:
    """Full attention over all N tokens (what MoGA replaces). (B, N, H, D) -> (B, N, H, D)."""
    return baselines.dense_sdpa(q, k, v)


def naive_recipe(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, M: int) -> torch.Tensor:
    """argsort by group, gather, one SDPA call per group, scatter back (B = 1)."""
    return baselines.sorted_recipe(q, k, v, group_ids, M)


def cpu_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, M: int) -> torch.Tensor:
    return moga.group_attention(q, k, v, group_ids, num_groups=M, backend="cpu")


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, process CPU) seconds of each fn over `repeats` rounds; every round runs every fn once, so all of
    them see the same background load from other users of the machine."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def _report(name: str, phase: str, median: float, lo: float, hi: float, cpu: float, flops: int) -> None:
    print(
        f"  {name:13s} {phase:8s} median {median * 1e3:9.1f} ms  {flops / median / 1e9:7.1f} GFLOP/s  "
        f"(min {lo * 1e3:.1f}, max {hi * 1e3:.1f}; process CPU time median {cpu * 1e3:.1f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--skip-dense", action="store_true", help="skip the (slow) dense baseline")
    parser.add_argument("--gemm", default="auto", choices=cpu_backend_module.GEMM_CHOICES, help="cpu backend GEMM")
    args = parser.parse_args()
    cpu_backend_module.set_gemm(args.gemm)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    N, H, D, M = args.n, args.heads, args.dim, args.groups
    q, k, v = (torch.randn(1, N, H, D, dtype=dtype) for _ in range(3))
    group_ids = (torch.arange(N) % M)[torch.randperm(N)].view(1, N)  # balanced: N / M tokens per group
    dout = torch.randn(1, N, H, D, dtype=dtype)

    impls = {"dense sdpa": dense_sdpa, "naive recipe": naive_recipe, "cpu backend": cpu_backend}
    if args.skip_dense:
        del impls["dense sdpa"]
    with torch.no_grad():
        ref = naive_recipe(q.float(), k.float(), v.float(), group_ids, M)
        err = ((cpu_backend(q, k, v, group_ids, M).float() - ref).norm() / ref.norm()).item()
    print(
        f"N={N} H={H} D={D} M={M} {args.dtype}, threads={torch.get_num_threads()}, repeats={args.repeats}, "
        f"cpu backend GEMM: {cpu_backend_module.gemm_in_use()}"
    )
    print(f"cpu backend vs naive recipe: relative error {err:.2e}")

    fns: dict[tuple[str, str], Callable[[], object]] = {}
    for name, fn in impls.items():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

        def fwd(fn=fn) -> None:
            with torch.no_grad():
                fn(q, k, v, group_ids, M)

        def fwd_bwd(fn=fn, leaves=leaves) -> None:
            for t in leaves:
                t.grad = None
            fn(*leaves, group_ids, M).backward(dout)

        fns[name, "fwd"], fns[name, "fwd+bwd"] = fwd, fwd_bwd
    sizes = torch.bincount(group_ids[0], minlength=M).tolist()
    results: dict[tuple[str, str], float] = {}
    for phase in ("fwd", "fwd+bwd"):
        times = time_rounds({name: fns[name, phase] for name in impls}, args.repeats)
        for name in impls:
            wall = [w for w, _ in times[name]]
            results[name, phase] = statistics.median(wall)
            cpu = statistics.median(c for _, c in times[name])
            # FLOPs of the work each implementation does: dense N^2, or the groups' sum of n_g^2.
            backward = phase == "fwd+bwd"
            flops = dense_attention_flops(N, D, H, backward) if name == "dense sdpa" else (
                group_attention_flops(sizes, D, H, backward))  # fmt: skip
            _report(name, phase, results[name, phase], min(wall), max(wall), cpu, flops)
    for base in [b for b in impls if b != "cpu backend"]:
        for phase in ("fwd", "fwd+bwd"):
            ratio = results[base, phase] / results["cpu backend", phase]
            print(f"speed-up of cpu backend over {base:12s} {phase:8s} {ratio:6.2f}x")


if __name__ == "__main__":
    main()
