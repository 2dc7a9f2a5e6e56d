"""What the varlen backend's host-known max_q/max_k bounds cost: the same segment attention with the default bound
(the layout's own, else the total number of positions) and with the exact longest segment (read back once,
before timing, and passed through ``varlen_backend.seqlen_bounds``).

    python bench/varlen_bounds.py [--json PATH] [--reps 20]

Needs CUDA and torch's varlen_attn; on a machine without them it says so and exits with status 2. Cases: routed
groups (few long segments, bound = total), many short segments without a layout bound (the worst case the
window layouts avoid by carrying their own bound), and a window layout (bound = window volume). Each is timed
forward and forward+backward (median of ``--reps`` CUDA-event timings after two warm-up calls).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import torch

from moga.backends import varlen_backend
from moga.bench.timing import time_call
from moga.layout import routed_layout
from moga.window import window_layout


def _cases(device: torch.device) -> list[tuple[str, object, int]]:
    """(name, SegmentLayout, number of tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, m in ((131072, 8), (32768, 512)):
        ids = torch.randint(0, m, (1, n, 1), generator=g).to(device)
        out.append((f"routed N={n} M={m}", routed_layout(ids, m).segments, n))
    grid, window = (16, 32, 64), (2, 8, 8)  # 32768 tokens in 1024 windows of 128
    out.append((f"window grid={grid} window={window}", window_layout(grid, window, (0,), 0, device, 1).segments, 32768))
    return out


def _fwd(q, k, v, layout, bounds, dout) -> None:
    """One segment attention call under ``bounds``; with ``dout``, its backward too."""
    scale = q.shape[-1] ** -0.5
    with torch.set_grad_enabled(dout is not None), varlen_backend.seqlen_bounds(*bounds):
        out = varlen_backend.segment_attention(q, k, v, layout, scale)
    if dout is not None:
        torch.autograd.grad(out, (q, k, v), dout)


def _time(fn, reps: int) -> float:
    """Median of exactly ``reps`` CUDA-event timings of ``fn()`` after two warm-up calls, in ms."""
    return time_call(fn, torch.device("cuda"), warmup=2, min_repeats=reps, max_repeats=reps).median_ms


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if not torch.cuda.is_available() or not varlen_backend.is_available():
        print("varlen_bounds: needs CUDA and torch.nn.attention.varlen.varlen_attn", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    H, D = args.heads, args.head_dim
    rows = []
    for name, layout, n in _cases(device):
        q, k, v = (torch.randn(n, H, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dout = torch.randn(layout.q_index.numel(), H, D, device=device, dtype=torch.bfloat16)
        exact_q = int(torch.diff(layout.q_offsets).max())
        exact_k = int(torch.diff(layout.k_offsets).max())
        default_q = layout.max_q_len or layout.q_index.numel()
        for bound, bounds in (("default", (None, None)), ("exact", (exact_q, exact_k))):
            row = {
                "case": name,
                "segments": layout.num_segments,
                "bound": bound,
                "max_q": bounds[0] or default_q,
                "exact_max_q": exact_q,
                "fwd_ms": _time(functools.partial(_fwd, q, k, v, layout, bounds, None), args.reps),
                "fwd_bwd_ms": _time(functools.partial(_fwd, q, k, v, layout, bounds, dout), args.reps),
            }
            rows.append(row)
            print(
                f"{name:<44} S={row['segments']:<6} {bound:<8} max_q={row['max_q']:<8} "
                f"fwd {row['fwd_ms']:8.3f} ms  fwd+bwd {row['fwd_bwd_ms']:8.3f} ms",
                flush=True,
            )
    if args.json:
        env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "heads": H, "head_dim": D}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
