"""Output of ``moga bench``: the text table and the JSON file, drawn from the sweep's rows (the plot: plot.py)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

from moga.bench.timing import NOISY_REL_IQR

FIELDS = ("n", "m", "distribution", "heads", "head_dim", "dtype")


def _fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def format_table(rows: list[Any], memory_note: str) -> str:
    """One block per case; ms = median time over the repeats, min / max = the fastest and slowest repeat,
    IQR% = interquartile range over the median (a row above timing.NOISY_REL_IQR is marked ``noisy``), n = repeats,
    TFLOP/s on the work done (from the median), %matmul = share of the measured bf16 matmul ceiling (GPU),
    x dense = dense SDPA's time / this time (same mode)."""
    header = (
        f"{'method':<26} {'mode':<8} {'ms':>10} {'min':>10} {'max':>10} {'IQR%':>5} {'n':>3} {'TFLOP/s':>9} "
        f"{'%matmul':>7} {'x dense':>8} {'peak MB':>9}  note"
    )
    lines: list[str] = []
    case = None
    for r in rows:
        key = tuple(getattr(r, f) for f in FIELDS)
        if key != case:
            case = key
            lines += ["", f"N={r.n} M={r.m} {r.distribution} H={r.heads} D={r.head_dim} {r.dtype}", header]
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        pct = None if r.fraction_of_matmul is None else 100 * r.fraction_of_matmul
        note = ("noisy" if r.noisy else "") if r.status == "ok" else f"{r.status}: {r.reason}"
        iqr = None if r.q1_ms is None or not r.median_ms else 100 * (r.q3_ms - r.q1_ms) / r.median_ms
        repeats = f"{r.repeats:>3}" if r.repeats is not None else f"{'-':>3}"
        lines.append(
            f"{r.method:<26} {r.mode:<8} {_fmt(r.median_ms, 10, 3)} {_fmt(r.min_ms, 10, 3)} {_fmt(r.max_ms, 10, 3)} "
            f"{_fmt(iqr, 5, 0)} {repeats} {_fmt(r.tflops, 9, 3)} {_fmt(pct, 7, 1)} {_fmt(r.speedup_vs_dense, 8, 2)} "
            f"{_fmt(mem, 9, 1)}  {note}".rstrip()
        )
    noisy = sum(1 for r in rows if r.status == "ok" and r.noisy)
    if noisy:
        lines += ["", f"{noisy} row(s) marked noisy: their repeats spread widely (IQR > {NOISY_REL_IQR:.0%} of the "
                      "median); rerun on an idle machine or with a larger --budget before reading them"]  # fmt: skip
    lines += ["", f"({memory_note})"]
    return "\n".join(lines)


def write_json(path: str, env: dict, check: list[Any], rows: list[Any]) -> None:
    doc = {
        "environment": env,
        "check": [c.as_dict() for c in check],
        "results": [asdict(r) for r in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
