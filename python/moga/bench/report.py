"""Output of ``moga bench``: the text table, the JSON file and the plot, all drawn from the sweep's rows."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any

FIELDS = ("n", "m", "distribution", "heads", "head_dim", "dtype")


def _fmt(value: float | None, width: int, decimals: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{decimals}f}"


def format_table(rows: list[Any], memory_note: str) -> str:
    """One block per case; ms = median time, TFLOP/s on the work done, %matmul = share of the measured bf16
    matmul ceiling (GPU), x dense = dense SDPA's time / this time (same mode)."""
    header = f"{'method':<26} {'mode':<8} {'ms':>10} {'TFLOP/s':>9} {'%matmul':>7} {'x dense':>8} {'peak MB':>9}  note"
    lines: list[str] = []
    case = None
    for r in rows:
        key = tuple(getattr(r, f) for f in FIELDS)
        if key != case:
            case = key
            lines += ["", f"N={r.n} M={r.m} {r.distribution} H={r.heads} D={r.head_dim} {r.dtype}", header]
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        pct = None if r.fraction_of_matmul is None else 100 * r.fraction_of_matmul
        note = "" if r.status == "ok" else f"{r.status}: {r.reason}"
        lines.append(
            f"{r.method:<26} {r.mode:<8} {_fmt(r.median_ms, 10, 3)} {_fmt(r.tflops, 9, 3)} {_fmt(pct, 7, 1)} "
            f"{_fmt(r.speedup_vs_dense, 8, 2)} {_fmt(mem, 9, 1)}  {note}".rstrip()
        )
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


def write_plot(path: str, rows: list[Any], env: dict) -> None:
    """Time and TFLOP/s vs N, one row of panels per (M, distribution), one line per (method, mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    panels = sorted({(r.m, r.distribution) for r in ok})
    if not panels:
        raise ValueError("nothing to plot: no measurement succeeded")
    fig, axes = plt.subplots(len(panels), 2, figsize=(12, 4 * len(panels)), squeeze=False)
    for (m, dist), (ax_t, ax_f) in zip(panels, axes, strict=True):
        series: dict[tuple[str, str], list[Any]] = {}
        for r in ok:
            if (r.m, r.distribution) == (m, dist):
                series.setdefault((r.method, r.mode), []).append(r)
        for (method, mode), pts in sorted(series.items()):
            pts.sort(key=lambda r: r.n)
            style = "-" if mode == "fwd" else "--"
            label = f"{method} {mode}"
            ax_t.plot([r.n for r in pts], [r.median_ms for r in pts], style, marker="o", label=label)
            ax_f.plot([r.n for r in pts], [r.tflops for r in pts], style, marker="o", label=label)
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_f, "TFLOP/s (work done)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"M={m} {dist}")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        ax_f.legend(fontsize=7)
    fig.suptitle(f"moga bench: {env['device']} ({env['device_type']}), torch {env['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
