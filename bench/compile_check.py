#!/usr/bin/env python3
"""No-GPU compile check: registers, spills and shared memory of every production Triton kernel configuration.

Imports every kernel package under ``kernels/`` that exposes ``compile_specs()`` (see
``kernels/compile_spec.py``), compiles each spec with Triton's ahead-of-time compiler for sm_80 and sm_90a
(or the architectures the spec names; no GPU needed), runs Triton's own ``ptxas -v`` on the PTX, prints one
table and exits non-zero when a configuration spills registers to local memory, exceeds the architecture's
shared memory per block, fails to compile, or (sm_90a) gets its wgmma instructions serialised by ptxas
(a "Potential Performance Loss: wgmma.mma_async instructions are serialized" note such as C7515: the kernel runs,
but without the asynchronous wgmma pipeline that is the point of a Hopper tile; see ``judge``).

    python bench/compile_check.py                    # all kernel packages, sm_80 and sm_90a
    python bench/compile_check.py --modules pkg.mod  # specific modules exposing compile_specs()
    python bench/compile_check.py --json out.json    # also one JSON record per (spec, arch): see ``record``
    PYTHONPATH=.venv/triton-3.6 python bench/compile_check.py --expect-triton 3.6.0   # another Triton

The report describes the cubin the running Triton would load: ptxas is run with that Triton's own flags (they
differ between versions: 3.8 adds ``--regAllocOptLevel=2``), and the resulting cubin is compared with Triton's.

TRITON_INTERPRET is removed from the environment first: under the interpreter ``@triton.jit`` yields
functions that cannot be compiled (and kernel packages may pick interpreter-only configurations).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

# Shared memory a block may use (opt-in maximum): 227 KB on sm_90, 163 KB on sm_80.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = {"sm_80": 80, "sm_90a": 90}


@dataclass
class PtxasReport:
    """One kernel's resource usage as printed by ``ptxas -v``."""

    function: str
    arch: str
    registers: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    static_smem: int = 0
    notes: list[str] = field(default_factory=list)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '([^']+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_PERF = re.compile(r"\((C\d+)\) Potential Performance Loss: (.*?) in the function '([^']+)'")


def parse_ptxas(text: str) -> dict[str, PtxasReport]:
    """Parse ``ptxas -v`` output into one report per entry function."""
    reports: dict[str, PtxasReport] = {}
    current: PtxasReport | None = None
    pending_notes: dict[str, list[str]] = {}
    for line in text.splitlines():
        if m := _PERF.search(line):  # printed before the function's own lines
            pending_notes.setdefault(m.group(3), []).append(f"{m.group(1)}: {m.group(2)}")
        if m := _ENTRY.search(line):
            current = reports[m.group(1)] = PtxasReport(m.group(1), m.group(2))
            current.notes += pending_notes.pop(m.group(1), [])
            continue
        if current is None:
            continue
        if m := _PROPS.search(line):
            current.stack_frame, current.spill_stores, current.spill_loads = map(int, m.groups())
        if m := _USED.search(line):
            current.registers = int(m.group(1))
            if s := _SMEM.search(line):
                current.static_smem = int(s.group(1))
    return reports


@dataclass
class Row:
    kernel: str  # the spec's name
    arch: str
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads
    stack_frame: int | None = None
    shared_bytes: int | None = None  # Triton's dynamic shared memory + ptxas' static smem
    compile_s: float | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # ptxas' "Potential Performance Loss" notes, e.g. "C7515: ..."
    uses_wgmma: bool | None = None  # the PTX's instruction use (None: not compiled)
    uses_tma: bool | None = None
    warp_specialized: bool | None = None
    cubin_matches: bool | None = None  # ptxas here produced Triton's own cubin byte for byte


# What the PTX uses, by instruction: Hopper's asynchronous MMA, TMA bulk tensor copies, and the register
# re-balancing between producer and consumer warp groups that Triton emits for warp-specialised loops.
PTX_FEATURES = {
    "uses_wgmma": "wgmma.mma_async",
    "uses_tma": "cp.async.bulk.tensor",
    "warp_specialized": "setmaxnreg",
}
# ptxas notes that fail a row on sm_90a: every "wgmma.mma_async instructions are serialized due to ..." note
# (C7515 and its siblings, one code per reason).
_SERIALISED_WGMMA = "wgmma.mma_async instructions are serialized"


def ptx_features(ptx: str) -> dict[str, bool]:
    """{uses_wgmma, uses_tma, warp_specialized}: which of PTX_FEATURES' instructions occur in ``ptx``."""
    return {key: instruction in ptx for key, instruction in PTX_FEATURES.items()}


def _ptxas_path(capability: int) -> str:
    from triton.backends.nvidia import compiler as nvidia

    try:
        tool = nvidia.get_ptxas(capability)
    except TypeError:  # older triton: get_ptxas() without an architecture
        tool = nvidia.get_ptxas()
    return tool.path if hasattr(tool, "path") else tool[0] if isinstance(tool, tuple) else str(tool)


def _ptxas_flag_sets() -> list[list[str]]:
    """Candidate ptxas flags (besides -v and --gpu-name) of the running Triton's make_cubin, most likely first.

    Triton 3.8 adds ``--regAllocOptLevel=2`` (a ptxas 13 workaround), Triton 3.6 does not; both pass
    ``-lineinfo``. The candidate whose cubin equals Triton's is the one the report is about (``compile_one``).
    """
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    try:
        uses_reg_alloc = "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin)
    except (OSError, TypeError):
        uses_reg_alloc = True
    with_opt, without = ["-lineinfo", "--regAllocOptLevel=2"], ["-lineinfo"]
    return [with_opt, without] if uses_reg_alloc else [without, with_opt]


def _run_ptxas(capability: int, gpu_name: str, ptx: str, flags: list[str]) -> tuple[subprocess.CompletedProcess, bytes]:
    """ptxas -v with ``flags`` on ``ptx``: (the finished process, the cubin; empty when ptxas failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = os.path.join(tmp, "k.ptx")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        cubin_path = os.path.join(tmp, "k.cubin")
        cmd = [_ptxas_path(capability), *flags, "-v", f"--gpu-name={gpu_name}", ptx_path, "-o", cubin_path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            return proc, b""
        with open(cubin_path, "rb") as f:
            return proc, f.read()


def _specs(module_name: str) -> list:
    return list(importlib.import_module(module_name).compile_specs())


def compile_one(module_name: str, index: int, arch: str) -> Row:
    """Compile spec ``index`` of ``module_name`` for ``arch`` and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = _specs(module_name)[index]
    capability = ARCHS[arch]
    row = Row(spec.name, arch)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=dict(spec.signature), constexprs=dict(spec.constexprs))
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    except Exception as exc:
        row.problems.append(f"compile failed: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
        return row
    row.compile_s = time.perf_counter() - t0
    ptx = kernel.asm["ptx"]
    row.uses_wgmma, row.uses_tma, row.warp_specialized = ptx_features(ptx).values()
    target = re.search(r"^\.target\s+(\S+)", ptx, re.MULTILINE)
    gpu_name = target.group(1).rstrip(",") if target else arch
    # ptxas with the running Triton's own flags, so that the report describes the very cubin Triton would load.
    # The running Triton's flags come first; when no candidate reproduces Triton's cubin (e.g. a cache entry built
    # with other knobs), the report is the one with those flags.
    runs = []
    for flags in _ptxas_flag_sets():
        proc, cubin = _run_ptxas(capability, gpu_name, ptx, flags)
        if proc.returncode != 0:
            row.problems.append(f"ptxas failed: {(proc.stderr or proc.stdout).strip()[-200:]}")
            return row
        runs.append(proc)
        row.cubin_matches = cubin == kernel.asm.get("cubin")
        if row.cubin_matches:
            break
    proc = runs[-1] if row.cubin_matches else runs[0]
    reports = parse_ptxas(proc.stdout + proc.stderr)
    report = reports.get(kernel.metadata.name) or (next(iter(reports.values())) if len(reports) == 1 else None)
    if report is None:
        row.problems.append(f"no ptxas report for {kernel.metadata.name!r}")
        return row
    row.registers = report.registers
    row.spill_bytes = report.spill_stores + report.spill_loads
    row.stack_frame = report.stack_frame
    row.shared_bytes = int(kernel.metadata.shared) + report.static_smem
    row.notes += report.notes
    row.problems += judge(row, capability)
    return row


def judge(row: Row, capability: int) -> list[str]:
    """Why this configuration is not fit for production (empty when it is).

    Fails: any spill to local memory; shared memory over the architecture's per-block limit; on sm_90 (Hopper),
    a ptxas note that wgmma instructions are serialised (C7515 and siblings): ptxas then waits for each wgmma
    before the next, the kernel stays correct but loses the asynchronous MMA pipeline, usually because the
    configuration is short of registers. Other ptxas notes are reported, not judged.
    """
    problems = []
    if row.spill_bytes:
        problems.append(f"spills {row.spill_bytes} bytes to local memory")
    if row.shared_bytes is not None and row.shared_bytes > SMEM_LIMIT[capability]:
        problems.append(f"shared memory {row.shared_bytes} B > {SMEM_LIMIT[capability]} B")
    if capability == 90:
        codes = [note.split(":")[0] for note in row.notes if _SERIALISED_WGMMA in note]
        if codes:
            problems.append(f"wgmma serialised by ptxas ({', '.join(codes)})")
    return problems


def record(row: Row, triton_version: str) -> dict:
    """One JSON record of a (spec, arch) compile.

    name, arch; registers, spill_bytes (spill stores + loads), stack_frame, smem_bytes (Triton's dynamic +
    ptxas' static shared memory): None when the spec did not compile; status "ok" or "fail" and problems (why it
    fails, see ``judge``); uses_wgmma / uses_tma / warp_specialized: the PTX contains wgmma.mma_async /
    cp.async.bulk.tensor / setmaxnreg; ptxas_notes: ptxas' "Potential Performance Loss" notes as "C7515: ...";
    cubin_matches: the figures are those of Triton's own cubin; compile_s; triton_version. ``kernel`` and
    ``shared_bytes`` repeat name and smem_bytes for readers of the earlier format.
    """
    return {
        "name": row.kernel,
        "arch": row.arch,
        "registers": row.registers,
        "spill_bytes": row.spill_bytes,
        "stack_frame": row.stack_frame,
        "smem_bytes": row.shared_bytes,
        "status": "fail" if row.problems else "ok",
        "problems": list(row.problems),
        "uses_wgmma": row.uses_wgmma,
        "uses_tma": row.uses_tma,
        "warp_specialized": row.warp_specialized,
        "ptxas_notes": list(row.notes),
        "cubin_matches": row.cubin_matches,
        "compile_s": row.compile_s,
        "triton_version": triton_version,
        "kernel": row.kernel,
        "shared_bytes": row.shared_bytes,
    }


def write_json(path: str, rows: list[Row], triton_version: str, elapsed_s: float, jobs: int) -> None:
    """The whole run: {"triton_version", "elapsed_s", "jobs", "failing", "rows": [record(row), ...]}."""
    doc = {
        "triton_version": triton_version,
        "elapsed_s": round(elapsed_s, 1),
        "jobs": jobs,
        "failing": sum(1 for r in rows if r.problems),
        "rows": [record(r, triton_version) for r in rows],
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def discover_modules() -> list[str]:
    """Kernel packages (``moga.kernels.<op>``) that expose compile_specs()."""
    import moga.kernels

    found = []
    for info in pkgutil.iter_modules(moga.kernels.__path__):
        if not info.ispkg:
            continue
        name = f"moga.kernels.{info.name}"
        if hasattr(importlib.import_module(name), "compile_specs"):
            found.append(name)
    return found


def _spec_archs(module_specs: dict[str, list], module: str, index: int, archs: list[str]) -> list[str]:
    """The requested architectures that launch this spec (all of them unless the spec names its own)."""
    own = getattr(module_specs[module][index], "archs", ())
    return [arch for arch in archs if not own or arch in own]


def _dedupe(module_specs: dict[str, list]) -> list[tuple[str, int, list[str]]]:
    """(module, index, names) per distinct configuration: identical compiles are done once."""
    seen: dict[tuple, tuple[str, int, list[str]]] = {}
    for module, specs in module_specs.items():
        for i, spec in enumerate(specs):
            fn = getattr(spec.fn, "fn", spec.fn)  # JITFunction.fn is the Python function
            key = (
                f"{fn.__module__}.{fn.__qualname__}",
                tuple(sorted(spec.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in spec.constexprs.items())),
                spec.num_warps,
                spec.num_stages,
                tuple(getattr(spec, "archs", ())),
            )
            if key in seen:
                seen[key][2].append(spec.name)
            else:
                seen[key] = (module, i, [spec.name])
    return list(seen.values())


def format_table(rows: list[Row]) -> str:
    width = max([len("kernel")] + [len(r.kernel) for r in rows])
    header = (
        f"{'kernel':<{width}}  {'arch':<7} {'regs':>5} {'spill B':>8} {'stack B':>8} {'smem B':>8} {'ptx':<12} status"
    )
    lines = [header]
    for r in rows:

        def num(v):
            return "-" if v is None else str(v)

        # wgmma / tma / ws (warp specialisation) when the PTX uses them
        ptx = ",".join(
            tag for tag, used in (("wgmma", r.uses_wgmma), ("tma", r.uses_tma), ("ws", r.warp_specialized)) if used
        )
        status = "; ".join(r.problems) if r.problems else "ok"
        notes = r.notes + (["cubin differs from Triton's: figures are indicative"] if r.cubin_matches is False else [])
        if notes:
            status += "  [" + "; ".join(notes) + "]"
        lines.append(
            f"{r.kernel:<{width}}  {r.arch:<7} {num(r.registers):>5} {num(r.spill_bytes):>8} "
            f"{num(r.stack_frame):>8} {num(r.shared_bytes):>8} {ptx or '-':<12} {status}"
        )
    return "\n".join(lines)


def _progress(results: Iterator[Row], total: int, t0: float, every: int = 25) -> list[Row]:
    """Collect ``results`` (in job order), printing a progress line every ``every`` compiles."""
    done: list[Row] = []
    for row in results:
        done.append(row)
        if len(done) % every == 0 and len(done) < total:
            failing = sum(1 for r in done if r.problems)
            print(
                f"compile_check: {len(done)}/{total} compiled, {failing} failing, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    return done


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", help="modules exposing compile_specs() (default: kernels/*)")
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=sorted(ARCHS))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    parser.add_argument("--json", metavar="PATH", help="write one record per (spec, arch) as JSON (see record())")
    parser.add_argument(
        "--expect-triton",
        metavar="VERSION",
        help="fail unless this Triton version is the one imported (guards a PYTHONPATH that did not take effect)",
    )
    args = parser.parse_args(argv)
    # Before any kernel module is imported: TRITON_INTERPRET is read when @triton.jit decorates a function.
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    triton_version = triton.__version__
    print(f"compile_check: Triton {triton_version} from {os.path.dirname(triton.__file__)}", flush=True)
    if args.expect_triton and triton_version != args.expect_triton:
        print(f"compile_check: expected Triton {args.expect_triton}, imported {triton_version}", file=sys.stderr)
        return 2

    t0 = time.perf_counter()
    modules = args.modules or discover_modules()
    module_specs = {m: _specs(m) for m in modules}
    if not any(module_specs.values()):
        print("compile_check: no kernel package exposes compile_specs(); nothing to compile")
        return 0
    configs = _dedupe(module_specs)
    per_config_archs = [_spec_archs(module_specs, module, index, args.arch) for module, index, _ in configs]
    jobs = [
        (module, index, arch)
        for (module, index, _), archs in zip(configs, per_config_archs, strict=True)
        for arch in archs
    ]
    n_specs = sum(len(s) for s in module_specs.values())
    print(
        f"compile_check: {n_specs} specs ({len(configs)} distinct), {len(jobs)} compiles for {args.arch} "
        f"from {modules}, {args.jobs} process(es)",
        flush=True,
    )
    if args.jobs <= 1:
        results = _progress((compile_one(*job) for job in jobs), len(jobs), t0)
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init) as pool:
            results = _progress(pool.map(compile_one, *zip(*jobs, strict=True)), len(jobs), t0)
    # Expand deduplicated configurations back to every spec name, in spec order.
    rows = []
    done = iter(results)
    for (_, _, names), archs in zip(configs, per_config_archs, strict=True):
        per_arch = [next(done) for _ in archs]
        for name in names:
            for r in per_arch:
                rows.append(Row(**{**asdict(r), "kernel": name}))
    print(format_table(rows))
    bad = [r for r in rows if r.problems]
    elapsed = time.perf_counter() - t0
    print(
        f"compile_check: Triton {triton_version}: {len(rows)} rows, {len(bad)} failing, {elapsed:.0f} s "
        f"({args.jobs} process(es))"
    )
    if args.json:
        write_json(args.json, rows, triton_version, elapsed, args.jobs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
