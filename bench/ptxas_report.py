"""Registers, spills and shared memory of every CUDA kernel in csrc/cuda, from ptxas, without a GPU.

Compiles each ``csrc/cuda/*.cu`` with ``nvcc -c -arch=<arch> -Xptxas -v`` for sm_80 and sm_90a and prints one row
per kernel. Dynamic shared memory (the attention tiles) is not visible to ptxas; it is read from the launchers'
own constexpr formulas in ``csrc/cuda/moga_cuda.h`` by compiling and running a tiny host program.

Exits non-zero when a production attention kernel (``segment_attn_*``) spills registers or its shared memory
exceeds the architecture's per-block limit. Usage: ``python bench/ptxas_report.py [--nvcc PATH]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm_80", "sm_90a")
# Opt-in shared memory per block (bytes).
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}
PRODUCTION_PREFIX = "segment_attn_"
# Which moga_cuda.h formula gives each attention kernel's dynamic shared memory.
DYNAMIC_SMEM_FN = {
    "segment_attn_fwd_kernel": "fwd_smem_bytes",
    "segment_attn_bwd_dq_kernel": "bwd_dq_smem_bytes",
    "segment_attn_bwd_dkdv_kernel": "bwd_dkdv_smem_bytes",
}
HEAD_DIMS = (64, 128)


@dataclass
class KernelInfo:
    arch: str
    source: str
    mangled: str
    name: str  # readable: base name plus template arguments, e.g. segment_attn_fwd_kernel<bf16,128>
    base: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    dynamic_smem: int = 0

    @property
    def production(self) -> bool:
        return self.base.startswith(PRODUCTION_PREFIX)

    @property
    def smem(self) -> int:
        return self.static_smem + self.dynamic_smem


def find_nvcc(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    cand = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return cand if os.path.exists(cand) else None


def readable_name(mangled: str) -> tuple[str, str]:
    """(base name, readable name) of a mangled kernel symbol, without needing a demangler."""
    base = mangled
    # Itanium names are length-prefixed; a digit run may end a hash and start a length ("b316tile..."), so every
    # suffix of each run is tried as the length of a name ending in "kernel".
    for run in re.finditer(r"\d+", mangled):
        digits = run.group(0)
        for i in range(len(digits)):
            length = int(digits[i:])
            name = mangled[run.end() : run.end() + length]
            if length > 0 and len(name) == length and name.endswith("kernel") and re.fullmatch(r"[A-Za-z_]\w*", name):
                base = name
                break
    args = []
    if "__nv_bfloat16" in mangled:
        args.append("bf16")
    elif "6__half" in mangled:
        args.append("fp16")
    d = re.search(r"Li(\d+)E", mangled)
    if d:
        args.append(f"D={d.group(1)}")
    return base, base + (f"<{','.join(args)}>" if args else "")


def parse_ptxas(text: str, arch: str, source: str) -> list[KernelInfo]:
    """Parse ``ptxas -v`` output (one block per function) into KernelInfo rows."""
    kernels: dict[str, KernelInfo] = {}
    current: KernelInfo | None = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            base, name = readable_name(m.group(1))
            current = kernels.setdefault(m.group(1), KernelInfo(arch, source, m.group(1), name, base))
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = kernels.get(m.group(1), current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.stack, current.spill_stores, current.spill_loads = (int(x) for x in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.static_smem = int(s.group(1)) if s else 0
    return list(kernels.values())


def dynamic_smem_table(nvcc: str, workdir: str) -> dict[tuple[str, int], int]:
    """{(kernel base name, D): bytes}, evaluated by the C++ formulas the launchers use."""
    lines = [
        f'  std::printf("%s %d %d\\n", "{k}", {d}, moga_cuda::{fn}({d}));'
        for k, fn in DYNAMIC_SMEM_FN.items()
        for d in HEAD_DIMS
    ]
    src = os.path.join(workdir, "smem_table.cu")
    exe = os.path.join(workdir, "smem_table")
    with open(src, "w") as f:
        f.write('#include <cstdio>\n#include "moga_cuda.h"\nint main() {\n' + "\n".join(lines) + "\n  return 0;\n}\n")
    subprocess.run([nvcc, "-std=c++17", "-I", CUDA_DIR, src, "-o", exe], check=True, capture_output=True, text=True)
    out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    table = {}
    for row in out.split("\n"):
        if row.strip():
            k, d, b = row.split()
            table[(k, int(d))] = int(b)
    return table


def compile_report(nvcc: str, sources: list[str] | None = None) -> list[KernelInfo]:
    """Compile each source for each arch; return every kernel's resource usage."""
    sources = sources or sorted(os.path.join(CUDA_DIR, f) for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))
    rows: list[KernelInfo] = []
    with tempfile.TemporaryDirectory() as tmp:
        smem = dynamic_smem_table(nvcc, tmp)
        for src in sources:
            for arch in ARCHS:
                cmd = [
                    nvcc,
                    "-std=c++17",
                    "-O3",
                    "--use_fast_math",
                    f"-arch={arch}",
                    "-Xptxas",
                    "-v",
                    "-c",
                    src,
                    "-o",
                    os.path.join(tmp, "k.o"),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {src} for {arch}:\n{proc.stderr[-4000:]}")
                for k in parse_ptxas(proc.stderr + proc.stdout, arch, os.path.basename(src)):
                    d = re.search(r"D=(\d+)", k.name)
                    if d:
                        k.dynamic_smem = smem.get((k.base, int(d.group(1))), 0)
                    rows.append(k)
    return rows


def problems(rows: list[KernelInfo]) -> list[str]:
    """Why the production kernels are not fit to ship (empty when they are)."""
    out = []
    for k in rows:
        if not k.production:
            continue
        if k.spill_stores or k.spill_loads:
            out.append(f"{k.name} on {k.arch} spills ({k.spill_stores} B stores, {k.spill_loads} B loads)")
        if k.smem > SMEM_LIMIT[k.arch]:
            out.append(f"{k.name} on {k.arch} needs {k.smem} B shared memory > {SMEM_LIMIT[k.arch]} B")
    return out


def format_table(rows: list[KernelInfo]) -> str:
    header = f"{'arch':7} {'kernel':44} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'smem B':>7} prod"
    lines = [header, "-" * len(header)]
    for k in sorted(rows, key=lambda r: (r.arch, not r.production, r.name)):
        lines.append(
            f"{k.arch:7} {k.name:44} {k.registers:>4} {k.spill_stores:>8} {k.spill_loads:>8} {k.stack:>5} "
            f"{k.smem:>7} {'yes' if k.production else ''}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nvcc", help="nvcc to use (default: PATH, then $CUDA_HOME/bin/nvcc)")
    args = parser.parse_args(argv)
    nvcc = find_nvcc(args.nvcc)
    if nvcc is None:
        print("ptxas_report: nvcc not found", file=sys.stderr)
        return 2
    rows = compile_report(nvcc)
    print(format_table(rows))
    bad = problems(rows)
    for p in bad:
        print("FAIL:", p, file=sys.stderr)
    if not any(k.production for k in rows):
        print("FAIL: no production attention kernel found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
