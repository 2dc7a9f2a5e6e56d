"""Run the extension build quietly: the full output goes to a log, the terminal gets one line per compiled object
and a ptxas summary (registers, spills) instead of ptxas's ~230 raw lines.

Usage (what ``make build`` runs)::

    python bench/build_log.py --log .venv/build.log [--ptxas-table] -- pip install -v --no-build-isolation -e .

Exit status: the command's. On failure the last 80 lines of the log are printed. ``--ptxas-table`` (``make build
PTXAS=1``) prints the per-kernel table of the objects compiled in this build; ``python bench/ptxas_report.py``
compiles every CUDA source itself and prints the same table for all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# ninja's progress line: "[3/12] /usr/local/cuda/bin/nvcc ... -c /path/csrc/cuda/scan.cu -o ..."
STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]\s.*?\s-c\s+(?:-c\s+)?(\S+\.(?:cu|cpp|c|cc))\b")
ARCH = re.compile(r"Compiling entry function '[^']+' for '(sm_\w+)'")


def _ptxas_report():
    """bench/ptxas_report.py as a module, executed once and cached in sys.modules (dataclasses look it up there)
    under the name tests/utils.py's load_bench_script gives it."""
    name = "moga_bench_ptxas_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "ptxas_report.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def ptxas_kernels(log: str) -> list:
    """Every (kernel, arch) ptxas reported in ``log`` (KernelInfo rows of bench/ptxas_report.py)."""
    report = _ptxas_report()
    chunks: list[tuple[str, list[str]]] = []
    for line in log.splitlines():
        m = ARCH.search(line)
        if m and (not chunks or chunks[-1][0] != m.group(1)):
            chunks.append((m.group(1), []))
        if chunks:
            chunks[-1][1].append(line)
    rows = []
    for arch, lines in chunks:
        rows += report.parse_ptxas("\n".join(lines), arch, "build")
    return rows


def summary(log: str, table: bool = False) -> str:
    """Objects compiled, then ptxas in a few lines: kernels per arch, the most registers, every spill."""
    steps = [m for m in (STEP.match(line) for line in log.splitlines()) if m]
    lines = [f"compiled {len(steps)} object(s)" + ("" if steps else " (all up to date)")]
    rows = ptxas_kernels(log)
    if not rows:
        return "\n".join(lines)
    per_arch: dict[str, int] = {}
    for k in rows:
        per_arch[k.arch] = per_arch.get(k.arch, 0) + 1
    top = max(rows, key=lambda k: k.registers)
    spills = [k for k in rows if k.spill_stores or k.spill_loads]
    arches = ", ".join(f"{a}: {n}" for a, n in sorted(per_arch.items()))
    lines.append(
        f"ptxas: {len(rows)} kernel(s) ({arches}); most registers {top.registers} ({top.name}, {top.arch}); "
        + ("no spills" if not spills else f"{len(spills)} SPILL(S):")
    )
    for k in spills:
        lines.append(f"  {k.name} on {k.arch}: {k.spill_stores} B spill stores, {k.spill_loads} B spill loads")
    if table:
        lines.append(_ptxas_report().format_table(rows))
    else:
        lines.append("  (per-kernel table: make build PTXAS=1, or python bench/ptxas_report.py)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", required=True, help="file that receives the command's whole output")
    parser.add_argument("--ptxas-table", action="store_true", help="print the per-kernel ptxas table")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the build command")
    args = parser.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        parser.error("no command given")
    t0 = time.monotonic()
    os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
    with open(args.log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            m = STEP.match(line)
            if m:
                print(f"  [{m.group(1)}/{m.group(2)}] {os.path.relpath(m.group(3))}", flush=True)
        rc = proc.wait()
    text = open(args.log).read()
    if rc != 0:
        print("\n".join(text.splitlines()[-80:]))
        print(f"build FAILED (exit {rc}) after {time.monotonic() - t0:.0f} s; whole log: {args.log}", file=sys.stderr)
        return rc
    print(summary(text, args.ptxas_table))
    print(f"build done in {time.monotonic() - t0:.0f} s (log: {args.log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
