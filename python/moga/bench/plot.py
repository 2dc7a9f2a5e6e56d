"""The figure of ``moga bench --plot PATH``: time, TFLOP/s and speedup over dense SDPA against N.

One row of three panels per (M, distribution) of the sweep. Each method has one colour in every panel (dense SDPA
black), each mode one line style (fwd solid, fwd+bwd dashed); the time panel shades each line's interquartile band
over the repeats (min and max are in the table and the JSON). One legend for the whole figure, below the panels
(it never covers data). The title names the device, dtype, H, D and torch version; panel titles name M and the
distribution.
"""

from __future__ import annotations

import os
from typing import Any

DENSE = "dense_sdpa"
MODE_STYLE = {"fwd": ("-", "o"), "fwd+bwd": ("--", "s")}
# 16 distinct colours (tab10, then the dark halves of tab20's other pairs); dense SDPA is black.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
)  # fmt: skip


def check_plot_path(path: str) -> None:
    """Create ``path``'s folder and make sure matplotlib imports: run before the sweep, so a bad path fails fast."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise SystemExit(f"moga bench: --plot {path}: folder {folder} is not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"moga bench: --plot needs matplotlib ({exc}); pip install matplotlib") from exc


def method_colors(methods: list[str]) -> dict[str, str]:
    """One colour per method, in order of first appearance; dense SDPA black; cycles only past 16 methods."""
    colors: dict[str, str] = {}
    others = [m for m in dict.fromkeys(methods) if m != DENSE]
    for i, name in enumerate(others):
        colors[name] = PALETTE[i % len(PALETTE)]
    colors[DENSE] = "#000000"
    return colors


def _common(rows: list[Any], field: str) -> str:
    values = sorted({str(getattr(r, field)) for r in rows})
    return values[0] if len(values) == 1 else "/".join(values)


def figure_title(rows: list[Any], env: dict) -> str:
    """Device, dtype, H, D, torch and date: what a reader needs to compare two figures."""
    date = str(env.get("date_utc", ""))[:10]
    return (
        f"moga bench on {env.get('device', '?')} ({env.get('device_type', '?')}): {_common(rows, 'dtype')}, "
        f"H={_common(rows, 'heads')}, D={_common(rows, 'head_dim')}, batch 1; torch {env.get('torch', '?')}, {date}"
    )


def write_plot(path: str, rows: list[Any], env: dict) -> None:
    """Draw the figure to ``path`` (any matplotlib format, e.g. .png or .svg); creates missing folders."""
    import matplotlib.pyplot as plt

    fig = make_figure(rows, env)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_figure(rows: list[Any], env: dict):
    """The matplotlib Figure of the sweep's rows (see the module docstring); raises ValueError with no ok row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    ok = [r for r in rows if r.status == "ok"]
    panels = sorted({(r.m, r.distribution) for r in ok})
    if not panels:
        raise ValueError("nothing to plot: no measurement succeeded")
    colors = method_colors([r.method for r in rows])
    fig, axes = plt.subplots(len(panels), 3, figsize=(16, 3.8 * len(panels) + 1.6), squeeze=False, layout="constrained")
    for (m, dist), (ax_t, ax_f, ax_s) in zip(panels, axes, strict=True):
        series: dict[tuple[str, str], list[Any]] = {}
        for r in ok:
            if (r.m, r.distribution) == (m, dist):
                series.setdefault((r.method, r.mode), []).append(r)
        for (method, mode), pts in series.items():
            pts.sort(key=lambda r: r.n)
            ls, marker = MODE_STYLE.get(mode, (":", "^"))
            style = {"color": colors[method], "linestyle": ls, "marker": marker, "markersize": 4, "linewidth": 1.4}
            n = [r.n for r in pts]
            ax_t.plot(n, [r.median_ms for r in pts], **style)
            if all(r.q1_ms is not None for r in pts):
                ax_t.fill_between(n, [r.q1_ms for r in pts], [r.q3_ms for r in pts], color=colors[method], alpha=0.15)
            ax_f.plot(n, [r.tflops for r in pts], **style)
            if method != DENSE and all(r.speedup_vs_dense is not None for r in pts):
                ax_s.plot(n, [r.speedup_vs_dense for r in pts], **style)
        ax_s.axhline(1.0, color="#000000", linewidth=0.8)
        labels = (
            (ax_t, "median time (ms), band: quartiles"),
            (ax_f, "TFLOP/s (work done)"),
            (ax_s, "speedup over dense SDPA (x)"),
        )
        for ax, ylabel in labels:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")  # figures span decades across methods and N
            ax.set_xlabel("N (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"M={m}, {dist} group sizes", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    used = list(dict.fromkeys(r.method for r in ok))
    handles = [Line2D([], [], color=colors[name], linewidth=2.5, label=name) for name in used]
    modes = list(dict.fromkeys(r.mode for r in ok))
    for mode in modes:
        ls, marker = MODE_STYLE.get(mode, (":", "^"))
        handles.append(Line2D([], [], color="#555555", linestyle=ls, marker=marker, label=mode))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=9, frameon=False)
    fig.suptitle(figure_title(ok, env), fontsize=11)
    return fig
