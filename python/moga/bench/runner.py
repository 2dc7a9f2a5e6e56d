"""``moga bench``: correctness check against dense attention, then the timing sweep.

Every figure of the sweep is a :class:`Row`; the table, the JSON file and the plot are all drawn from them.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
from dataclasses import dataclass

import torch

import moga
from moga.backends import cpu_backend
from moga.bench.cases import DISTRIBUTIONS, BenchCase, cpu_sweep, gpu_sweep, make_inputs
from moga.bench.check import CheckResult, describe_exception, failed_methods, format_check, run_check
from moga.bench.flops import dense_attention_flops, group_attention_flops
from moga.bench.methods import Method, methods_for, unavailable_backends
from moga.bench.plot import check_plot_path, write_plot
from moga.bench.report import format_table, write_json
from moga.bench.timing import peak_extra_memory_bytes, time_call

MODES = ("fwd", "fwd+bwd")
# Rates assumed only to *estimate* a call's time before running it (skip beyond --time-limit): bf16 dense
# attention on an H100-class GPU, and fp32 on a small CPU. Measured figures never use them.
ASSUMED_TFLOPS = {"cuda": 300.0, "cpu": 0.05}
MEMORY_NOTE = {
    "cuda": "peak_mem_bytes: torch.cuda.max_memory_allocated during one call, minus what was allocated before it",
    "cpu": "peak memory omitted on CPU: tracemalloc does not see torch's allocator, RSS peak is process-lifetime",
}


@dataclass
class Row:
    n: int
    m: int
    distribution: str
    heads: int
    head_dim: int
    dtype: str
    method: str
    kind: str  # "moga" or "baseline"
    mode: str
    status: str  # "ok" | "skipped" | "error" | "check_failed" (dropped: the method failed the correctness check)
    reason: str | None = None
    median_ms: float | None = None
    repeats: int | None = None
    samples_ms: list[float] | None = None  # every timed call (see timing.py), in order
    min_ms: float | None = None
    max_ms: float | None = None
    q1_ms: float | None = None  # 25th percentile of samples_ms
    q3_ms: float | None = None  # 75th percentile
    noisy: bool | None = None  # (q3 - q1) / median > timing.NOISY_REL_IQR
    flops: int | None = None
    tflops: float | None = None
    fraction_of_matmul: float | None = None  # tflops / measured bf16 matmul ceiling (GPU only)
    speedup_vs_dense: float | None = None
    peak_mem_bytes: int | None = None
    estimated_s: float | None = None


def method_names(device: torch.device | None = None) -> list[str]:
    """Names of the methods ``moga bench`` times on ``device``, from the methods registry
    (:func:`moga.bench.methods.methods_for`) on a tiny probe case; names do not depend on the case.
    ``device=None`` (default): every method the registry knows, without touching any device (for ``--help``:
    ``moga --version``, ``moga plan`` and the help start no CUDA); the run checks ``--methods`` against the
    methods of its device."""
    probe = BenchCase(64, 2, "balanced", 1, 64, "float32" if device is None or device.type == "cpu" else "bfloat16")
    return [m.name for m in methods_for(probe, device, quick=False)]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if present")
    p.add_argument("--quick", action="store_true", help="trimmed sweep (CPU: under two minutes)")
    p.add_argument("--json", metavar="PATH", help="write every figure (check, rows, metadata) as JSON")
    p.add_argument(
        "--plot",
        metavar="PATH",
        help="draw time, TFLOP/s and speedup over dense vs N (matplotlib, Agg; missing folders are created)",
    )
    p.add_argument("--n", type=int, nargs="+", help="override the sweep's sequence lengths")
    p.add_argument("--m", type=int, nargs="+", help="override the sweep's group counts")
    p.add_argument("--dist", choices=DISTRIBUTIONS, nargs="+", help="override the group-size distributions")
    p.add_argument("--heads", type=int, help="override Hq (= Hkv)")
    p.add_argument("--head-dim", type=int, help="override D")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="override the sweep dtype")
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        help="only methods whose name contains one of these strings (dense_sdpa always runs: the speedup "
        f"baseline); methods in the registry (the run skips those its device lacks): {', '.join(method_names())}",
    )
    p.add_argument(
        "--modes",
        choices=MODES,
        nargs="+",
        default=list(MODES),
        help="fwd: forward under no_grad; fwd+bwd: forward plus backward of all inputs (default: both)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="S",
        help="skip a call whose time estimated from FLOPs exceeds S seconds (default: 20 GPU, 10 CPU)",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="S",
        help="seconds of repeats per measurement (default: 1 GPU, 0.5 CPU; at least 3 repeats)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the correctness check (not recommended)")
    p.add_argument("--seed", type=int, default=0)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("moga bench: --device cuda but torch.cuda.is_available() is False")
    return torch.device(name)


def build_cases(args: argparse.Namespace, device: torch.device) -> list[BenchCase]:
    base = gpu_sweep(args.quick) if device.type == "cuda" else cpu_sweep(args.quick)
    ns = args.n or sorted({c.n for c in base})
    ms = args.m or sorted({c.m for c in base})
    dists = args.dist or [d for d in DISTRIBUTIONS if any(c.distribution == d for c in base)]
    heads = args.heads or base[0].heads
    head_dim = args.head_dim or base[0].head_dim
    dtype = args.dtype or base[0].dtype
    for name, values in (("--n", ns), ("--m", ms)):
        if any(v < 1 for v in values):
            raise SystemExit(f"moga bench: {name} values must be positive, got {values}")
    return [BenchCase(n, m, d, heads, head_dim, dtype) for n in ns for m in ms for d in dists]


def selected_methods(case: BenchCase, device: torch.device, args: argparse.Namespace) -> list[Method]:
    """The case's methods, filtered by --methods (dense SDPA always stays: it is the speedup baseline)."""
    methods = methods_for(case, device, args.quick)
    if not args.methods:
        return methods
    return [m for m in methods if m.name == "dense_sdpa" or any(s in m.name for s in args.methods)]


def _flops(case: BenchCase, method: Method, backward: bool) -> int:
    if method.dense_flops:
        return dense_attention_flops(case.n, case.head_dim, case.heads, backward)
    return group_attention_flops(case.sizes, case.head_dim, case.heads, backward)


def _timed_fn(fn, inputs, mode: str):
    """The callable to time: the forward under no_grad, or forward plus backward with fresh grads."""
    if mode == "fwd":
        q, k, v = inputs.q, inputs.k, inputs.v

        def run():
            with torch.no_grad():
                return fn(q, k, v)

        return run
    q, k, v = (t.detach().requires_grad_(True) for t in (inputs.q, inputs.k, inputs.v))
    dout = torch.randn_like(inputs.q)

    def run_bwd():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    return run_bwd


def check_method_filters(cases: list[BenchCase], device: torch.device, args: argparse.Namespace) -> None:
    """Exit with the list of names when a --methods string matches no method of the sweep (a typo)."""
    if not args.methods:
        return
    names = {m.name for c in cases for m in methods_for(c, device, args.quick)}
    unknown = [s for s in args.methods if not any(s in n for n in names)]
    if unknown:
        raise SystemExit(f"moga bench: --methods {unknown} match no method; methods: {', '.join(sorted(names))}")


def measure_case(
    case: BenchCase,
    device: torch.device,
    args: argparse.Namespace,
    progress,
    dropped: dict[str, str] | None = None,
) -> list[Row]:
    """Time every selected method of ``case``; methods in ``dropped`` (name -> why) get rows with status
    ``check_failed`` and are not run."""
    dropped = dropped or {}
    inputs = make_inputs(case, device, args.seed)
    rate = ASSUMED_TFLOPS[device.type] * 1e12
    limit = args.time_limit if args.time_limit is not None else (20.0 if device.type == "cuda" else 10.0)
    budget = args.budget if args.budget is not None else (1.0 if device.type == "cuda" else 0.5)
    rows: list[Row] = []
    dense_ms: dict[str, float] = {}
    for method in selected_methods(case, device, args):
        fn = None
        for mode in args.modes:
            backward = mode == "fwd+bwd"
            flops = _flops(case, method, backward)
            est = flops / rate
            row = Row(
                **{f: getattr(case, f) for f in ("n", "m", "distribution", "heads", "head_dim", "dtype")},
                method=method.name,
                kind=method.kind,
                mode=mode,
                status="skipped",
                flops=flops,
                estimated_s=est,
            )
            rows.append(row)
            progress.set_postfix_str(f"{case.label()} {method.name} {mode}")
            if method.name in dropped:
                row.status, row.reason = "check_failed", f"failed the correctness check: {dropped[method.name]}"
            elif method.skip_reason:
                row.reason = method.skip_reason
            elif backward and not method.differentiable:
                row.reason = f"no backward on {device.type}"
            elif est > limit:
                row.reason = f"estimated {est:.0f} s > --time-limit {limit:g} s"
            else:
                try:
                    fn = fn or method.build(inputs)
                    call = _timed_fn(fn, inputs, mode)
                    timing = time_call(call, device, budget_s=budget)
                    row.peak_mem_bytes = peak_extra_memory_bytes(call, device)
                except Exception as exc:  # shown in the table; a moga failure also fails the run
                    row.status, row.reason = "error", describe_exception(exc, width=160)
                else:
                    row.status, row.median_ms, row.repeats = "ok", timing.median_ms, timing.repeats
                    row.samples_ms, row.min_ms, row.max_ms = timing.samples_ms, timing.min_ms, timing.max_ms
                    (row.q1_ms, row.q3_ms), row.noisy = timing.quartiles_ms, timing.noisy
                    row.tflops = flops / (timing.median_ms * 1e-3) / 1e12
                    if method.name == "dense_sdpa":
                        dense_ms[mode] = timing.median_ms
                    if mode in dense_ms:
                        row.speedup_vs_dense = dense_ms[mode] / timing.median_ms
            progress.update(1)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def environment(device: torch.device) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "moga": moga.__version__,
        "backends_available": moga.available_backends(),
        "backends_unavailable": unavailable_backends(),
        # float32 GEMM of the cpu backend ("avx512" or "blas"; None without the extension), see set_gemm
        "cpu_gemm": cpu_backend.gemm_in_use(),
        "argv": sys.argv,
        "memory_note": MEMORY_NOTE[device.type],
        "flops_note": "forward 4*sum_g n_g^2*D*Hq (dense: one group of N); forward+backward 3.5x forward",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        from moga.bench.ceiling import matmul_tflops

        # the auto table (bench/make_auto_table.py) is keyed by compute capability
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["cudnn"] = torch.backends.cudnn.version()

        info["matmul_bf16_8192_tflops"] = matmul_tflops(device=str(device))
    return info


def run(args: argparse.Namespace) -> int:
    """The bench's main job; returns the process exit code (non-zero when a check or a moga path fails)."""
    from tqdm import tqdm

    device = _resolve_device(args.device)
    cases = build_cases(args, device)
    check_method_filters(cases, device, args)
    if args.plot:  # before the sweep: a bad path or a missing matplotlib must not cost the whole run
        check_plot_path(args.plot)
    env = environment(device)
    print(f"moga bench on {env['device']} ({device.type}), torch {env['torch']}, triton {env['triton']}")
    print(f"backends: {env['backends_available']}; not available: {env['backends_unavailable']}")
    if device.type == "cpu":
        print(f"cpu backend GEMM: {env['cpu_gemm']}")
    if "matmul_bf16_8192_tflops" in env:
        print(f"matmul ceiling (8192^3 bf16 torch.matmul): {env['matmul_bf16_8192_tflops']:.0f} TFLOP/s")

    check: list[CheckResult] = []
    dropped: dict[str, str] = {}
    if not args.no_check:
        check, dropped = _run_check(cases, device, args)

    total = sum(len(selected_methods(c, device, args)) for c in cases) * len(args.modes)
    rows: list[Row] = []
    ceiling = env.get("matmul_bf16_8192_tflops")
    with tqdm(total=total, desc="sweep", unit="call", file=sys.stderr) as progress:
        for case in cases:
            case_rows = measure_case(case, device, args, progress, dropped)
            for r in case_rows:
                if ceiling and r.tflops is not None:
                    r.fraction_of_matmul = r.tflops / ceiling
            rows.extend(case_rows)
            if args.json:  # after every case, so a run cut short by a time limit keeps what it measured
                write_json(args.json, env, check, rows)

    print()
    print(format_table(rows, env["memory_note"]))
    if args.json:
        write_json(args.json, env, check, rows)
        print(f"wrote {args.json}")
    status = 0
    if args.plot:
        try:
            write_plot(args.plot, rows, env)
            print(f"wrote {args.plot}")
        except (ValueError, OSError) as exc:  # the table and the JSON above stay
            print(f"FAILED: plot not written: {exc}", file=sys.stderr)
            status = 1
    if dropped:
        print(f"FAILED: correctness check of {', '.join(sorted(dropped))}; their timings were dropped", file=sys.stderr)
        status = 1
    moga_errors = [r for r in rows if r.status == "error" and r.kind == "moga"]
    if moga_errors:
        print(f"FAILED: {len(moga_errors)} moga measurement(s) raised; see the table", file=sys.stderr)
        status = 1
    return status


def _run_check(
    cases: list[BenchCase], device: torch.device, args: argparse.Namespace
) -> tuple[list[CheckResult], dict[str, str]]:
    """The correctness check; returns its results and the methods to drop (name -> why). A path that fails drops
    only its own method; if the check itself cannot run (its reference raised), every moga method is dropped."""
    dtype = cases[0].torch_dtype
    print(f"\ncorrectness check vs float64 reference ({dtype}, {device.type}):")
    try:
        check = run_check(device, dtype, args.seed)
    except Exception as exc:  # the shared reference part: nothing of moga can be trusted without it
        check = [CheckResult.raised("check", exc)]
        moga_methods = {m.name for c in cases for m in selected_methods(c, device, args) if m.kind == "moga"}
        dropped = {name: f"the check itself raised {check[0].error}" for name in moga_methods}
    else:
        dropped = failed_methods(check)
    print(format_check(check))
    for name, why in sorted(dropped.items()):
        print(f"FAILED check: {name} ({why}); its timings are dropped, the others are still timed", file=sys.stderr)
    return check, dropped
