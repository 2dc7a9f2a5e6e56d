"""Tile-configuration sweep of the Triton segment-attention kernels on a GPU: medians per launch configuration.

    python3 bench/tile_sweep.py --json OUT.json            # on a lent GPU (part of bench/gpu_check.sh)
    python3 bench/tile_sweep.py --list                      # the cases, anywhere (no GPU needed)

Main shapes: bf16, D = 128 and 64, kernels ``fwd``, ``dq`` and ``dkdv``. For each (kernel, D) it times the
configuration production launches on this device (``configs.production_config``; Hopper entries on sm_90), the
other table's entry where it differs (sm_80 table vs Hopper), and the candidates named in issue #11 (forward D=128
with 5 stages; dk/dv D=128 with BM=32, BN=128, 8 warps; dq D=128 with BN=64), plus any ``--extra`` ones.
Each candidate is installed with ``moga.kernels.segment_attention.configs.override(kernel, head_dim, dtype, cfg)``
and run through the library's own entry points:

* ``fwd``: ``segment_attention_fwd`` alone;
* ``dq`` / ``dkdv``: ``segment_attention_bwd`` (preprocess + dk/dv + dq); only the named kernel's configuration
  differs between the rows of one (kernel, D), so differences between those rows are that kernel's.

Problem: N tokens (default 32768) routed to M balanced groups (default 8, shuffled positions, as a router makes),
H heads (default 16). Medians come from ``triton.testing.do_bench`` (CUDA events, ``return_mode="median"``). Each
row also records its largest relative difference to the production configuration's results (out, or dq/dk/dv), so
a configuration that computes something else is flagged (``mismatch``) instead of winning. The JSON is rewritten
after every row; ``--max-seconds`` stops starting new rows once the time is spent (rows left are ``not run``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

KERNELS = ("fwd", "dq", "dkdv")
HEAD_DIMS = (128, 64)  # D = 128 first: the paper's head dim and where the candidates are
# Relative difference to the production configuration's results above which a row is flagged: bf16 outputs of two
# tilings differ by accumulation order only (~1e-3); a wrong tiling differs by O(1).
MISMATCH_TOL = 2e-2


@dataclass(frozen=True)
class Candidate:
    """One configuration to time: block_m / block_n / num_warps / num_stages as in configs.KernelConfig."""

    kernel: str
    head_dim: int
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    source: str  # "production", "sm80-table", "issue-11", "extra"
    note: str = ""

    @property
    def tiles(self) -> tuple[int, int, int, int]:
        return (self.block_m, self.block_n, self.num_warps, self.num_stages)

    def label(self) -> str:
        bm, bn, w, s = self.tiles
        return f"{self.kernel} D={self.head_dim} BM={bm} BN={bn} w={w} s={s}"


# The candidates issue #11 names (compiled spill-free by its review, never timed).
ISSUE_11 = (
    Candidate("fwd", 128, 128, 64, 8, 5, "issue-11", "sm_90a: 5 stages (3 buffers, 132 KB shared memory)"),
    Candidate("dkdv", 128, 32, 128, 8, 2, "issue-11", "BM=32, BN=128, 8 warps: each warpgroup its own half of S^T"),
    Candidate("dq", 128, 128, 64, 8, 3, "issue-11", "BN=64 instead of 32"),
)


@dataclass
class Row:
    kernel: str
    head_dim: int
    dtype: str
    config: dict
    source: str
    note: str
    status: str = "not run"  # "ok" | "mismatch" | "error" | "not run"
    timed: str = ""
    median_ms: float | None = None
    tflops: float | None = None
    rel_diff_vs_production: float | None = None
    error: str | None = None
    seconds: float | None = None  # wall time of this row, compilation included


@dataclass
class Problem:
    n: int
    m: int
    heads: int
    dtype: str = "bfloat16"
    seed: int = 0
    notes: list[str] = field(default_factory=list)


def parse_extra(spec: str) -> Candidate:
    """``kernel:D:BM,BN,warps,stages`` -> Candidate (e.g. ``dq:64:128,128,8,2``)."""
    try:
        kernel, d, tiles = spec.split(":")
        bm, bn, w, s = (int(x) for x in tiles.split(","))
        head_dim = int(d)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--extra wants kernel:D:BM,BN,warps,stages, got {spec!r}") from exc
    if kernel not in KERNELS:
        raise argparse.ArgumentTypeError(f"--extra kernel must be one of {KERNELS}, got {kernel!r}")
    return Candidate(kernel, head_dim, bm, bn, w, s, "extra")


def _production(kernel: str, head_dim: int, hopper: bool) -> Candidate:
    import torch

    from moga.kernels.segment_attention.configs import production_config

    c = production_config(kernel, head_dim, torch.bfloat16, hopper=hopper)
    return Candidate(kernel, head_dim, c.block_m, c.block_n, c.num_warps, c.num_stages, "production")


def build_candidates(
    hopper: bool,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    kernels: tuple[str, ...] = KERNELS,
    extra: tuple[Candidate, ...] = (),
    production: Callable[[str, int, bool], Candidate] = _production,
) -> list[Candidate]:
    """Rows in sweep order: per D (128 first), per kernel: production first (the reference of the others), then the
    other architecture's table entry when it differs (Hopper only), then issue #11's candidates and ``extra``.
    Duplicates of an earlier row of the same (kernel, D) are dropped."""
    rows: list[Candidate] = []
    for d in head_dims:
        for kernel in kernels:
            prod = production(kernel, d, hopper)
            group = [prod]
            if hopper:
                table = production(kernel, d, False)
                group.append(Candidate(kernel, d, *table.tiles, "sm80-table", "the non-Hopper table's entry"))
            group += [c for c in (*ISSUE_11, *extra) if c.kernel == kernel and c.head_dim == d]
            seen: set[tuple[int, int, int, int]] = set()
            for c in group:
                if c.tiles not in seen:
                    seen.add(c.tiles)
                    rows.append(c)
    return rows


def write_json(path: str, environment: dict, problem: Problem, rows: list[Row]) -> None:
    """The whole document, written to a temporary file and renamed (a run killed mid-write keeps the last one)."""
    doc = {"environment": environment, "problem": asdict(problem), "rows": [asdict(r) for r in rows]}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def new_row(c: Candidate) -> Row:
    config = {"block_m": c.block_m, "block_n": c.block_n, "num_warps": c.num_warps, "num_stages": c.num_stages}
    return Row(c.kernel, c.head_dim, "bfloat16", config, c.source, c.note)


def sweep(
    candidates: list[Candidate],
    measure: Callable[[Candidate], dict],
    json_path: str | None,
    environment: dict,
    problem: Problem,
    max_seconds: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Measure each candidate in order with ``measure(c) -> {"median_ms", "tflops", "rel_diff", "timed"}``; an
    exception marks that row "error" and the sweep goes on. Rows not started before ``max_seconds`` stay
    "not run". The JSON (if a path is given) is rewritten after every row."""
    rows = [new_row(c) for c in candidates]
    start = clock()
    if json_path:
        write_json(json_path, environment, problem, rows)
    for c, row in zip(candidates, rows, strict=True):
        if max_seconds is not None and clock() - start >= max_seconds:
            log(f"{c.label():45s} not run (--max-seconds {max_seconds:g} spent)")
            continue
        t0 = clock()
        try:
            m = measure(c)
        except Exception as exc:  # one bad configuration (out of shared memory, launch failure) ends only its row
            first_line = (str(exc).splitlines() or [""])[0]
            row.status, row.error = "error", f"{type(exc).__name__}: {first_line[:300]}"
        else:
            row.median_ms, row.tflops, row.timed = m["median_ms"], m.get("tflops"), m.get("timed", "")
            row.rel_diff_vs_production = m.get("rel_diff")
            bad = row.rel_diff_vs_production is not None and not row.rel_diff_vs_production <= MISMATCH_TOL
            row.status = "mismatch" if bad else "ok"
        row.seconds = round(clock() - t0, 2)
        shown = f"{row.median_ms:9.3f} ms" if row.median_ms is not None else row.error or ""
        log(f"{c.label():45s} {c.source:10s} {row.status:8s} {shown}")
        if json_path:
            write_json(json_path, environment, problem, rows)
    return rows


# ---------------------------------------------------------------------------------------------------- on the GPU


class GpuMeasure:
    """Times candidates on one CUDA device: inputs and the routed layout built once per head dim, references (the
    production configuration's results) computed once per (kernel, D)."""

    def __init__(self, problem: Problem, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.problem = problem
        self.device = torch.device(device)
        self._inputs: dict[int, tuple] = {}
        self._reference: dict[tuple[str, int], tuple] = {}

    def inputs(self, head_dim: int):
        if head_dim not in self._inputs:
            torch = self.torch
            from moga.bench.flops import group_attention_flops
            from moga.layout import routed_layout

            self._inputs.clear()  # one head dim at a time on the device
            p = self.problem
            gen = torch.Generator(device=self.device).manual_seed(p.seed)
            shape = (p.n, p.heads, head_dim)
            q, k, v, dout = (
                torch.randn(shape, generator=gen, device=self.device, dtype=torch.bfloat16) for _ in range(4)
            )
            ids = torch.arange(p.n, device=self.device) % p.m  # balanced sizes ...
            ids = ids[torch.randperm(p.n, generator=gen, device=self.device)]  # ... at shuffled positions
            layout = routed_layout(ids.view(1, p.n, 1), p.m).segments
            sizes = torch.bincount(ids, minlength=p.m).tolist()
            fwd_flops = float(group_attention_flops(sizes, head_dim, p.heads))
            self._inputs[head_dim] = (q, k, v, dout, layout, head_dim**-0.5, fwd_flops)
        return self._inputs[head_dim]

    def _run(self, kernel: str, head_dim: int) -> Callable[[], tuple]:
        from moga.kernels.segment_attention import segment_attention_bwd, segment_attention_fwd

        q, k, v, dout, layout, scale, _ = self.inputs(head_dim)
        if kernel == "fwd":
            return lambda: segment_attention_fwd(q, k, v, layout, scale)
        out, lse = segment_attention_fwd(q, k, v, layout, scale)  # production forward: the same for every row
        return lambda: segment_attention_bwd(dout, q, k, v, out, lse, layout, scale)

    def __call__(self, c: Candidate) -> dict:
        torch = self.torch
        import triton.testing

        from moga.bench.flops import BACKWARD_FACTOR
        from moga.kernels.segment_attention import configs

        cfg = configs.KernelConfig(c.block_m, c.block_n, c.num_warps, c.num_stages)
        _, _, _, _, _, _, fwd_flops = self.inputs(c.head_dim)
        with torch.no_grad(), configs.override(c.kernel, c.head_dim, torch.bfloat16, cfg):
            fn = self._run(c.kernel, c.head_dim)
            result = fn()
            torch.cuda.synchronize(self.device)
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        result = result if isinstance(result, tuple) else (result,)
        key = (c.kernel, c.head_dim)
        if c.source == "production" or key not in self._reference:
            self._reference[key] = tuple(t.float() for t in (result[:1] if c.kernel == "fwd" else result))
        ref = self._reference[key]
        got = result[:1] if c.kernel == "fwd" else result
        rel = max(float((g.float() - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(got, ref, strict=True))
        flops = fwd_flops if c.kernel == "fwd" else BACKWARD_FACTOR * fwd_flops  # backward alone: 5 matmuls to the 2
        timed = "segment_attention_fwd" if c.kernel == "fwd" else "segment_attention_bwd (preprocess + dkdv + dq)"
        return {"median_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12, "rel_diff": rel, "timed": timed}


def environment(device: str | None) -> dict:
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "argv": sys.argv,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if device and torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(device)
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    except ImportError:
        pass
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write every row (rewritten after each)")
    p.add_argument("--list", action="store_true", help="print the cases and exit (no GPU needed)")
    p.add_argument("--n", type=int, default=32768, help="tokens (default 32768)")
    p.add_argument("--m", type=int, default=8, help="balanced groups (default 8)")
    p.add_argument("--heads", type=int, default=16, help="heads (default 16)")
    p.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS), help="default: 128 64")
    p.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--extra", type=parse_extra, action="append", default=[], metavar="KERNEL:D:BM,BN,W,S")
    arch = p.add_mutually_exclusive_group()
    arch.add_argument("--hopper", dest="hopper", action="store_true", default=None, help="sm_90 tables (--list)")
    arch.add_argument("--no-hopper", dest="hopper", action="store_false", help="sm_80 tables (--list)")
    p.add_argument("--max-seconds", type=float, default=None, help="start no new row after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n", "m", "heads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be positive")

    hopper = args.hopper
    device = None
    if not args.list:
        import torch

        if not torch.cuda.is_available():
            print("tile_sweep: needs a CUDA device (use --list to see the cases anywhere)", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") == "1":
            print("tile_sweep: TRITON_INTERPRET=1 times the interpreter, not the kernels; unset it", file=sys.stderr)
            return 2
        device = "cuda"
        from moga.kernels.segment_attention import configs

        if not hasattr(configs, "override"):
            print("tile_sweep: moga.kernels.segment_attention.configs.override is missing", file=sys.stderr)
            return 2
        if hopper is None:
            hopper = configs.is_hopper(torch.device(device))
    if hopper is None:
        hopper = True  # --list without a device: the lent GPUs are Hopper (H100 / H200)

    candidates = build_candidates(hopper, tuple(args.head_dims), tuple(args.kernels), tuple(args.extra))
    problem = Problem(args.n, args.m, args.heads, seed=args.seed)
    problem.notes = [
        f"tables: {'Hopper (sm_90)' if hopper else 'sm_80'}",
        "fwd rows time segment_attention_fwd; dq/dkdv rows time the whole segment_attention_bwd",
        "tflops: forward 4*sum n_g^2*D*H; backward 2.5x that",
        f"status mismatch: relative difference to the production configuration's results > {MISMATCH_TOL}",
    ]
    if args.list:
        for c in candidates:
            print(f"{c.label():45s} {c.source:10s} {c.note}")
        return 0
    env = environment(device)
    where = f"{env.get('device')} (sm {env.get('capability')})"
    print(f"tile sweep on {where}, torch {env['torch']}, triton {env['triton']}")
    print(f"problem: N={args.n} M={args.m} H={args.heads} bf16; {len(candidates)} configurations")
    rows = sweep(candidates, GpuMeasure(problem, device), args.json, env, problem, args.max_seconds)
    bad = [r for r in rows if r.status in ("error", "mismatch")]
    if args.json:
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
