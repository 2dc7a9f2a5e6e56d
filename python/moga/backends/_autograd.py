"""One autograd wrapper for every kernel backend of segment attention.

A kernel backend supplies two functions (see :mod:`moga.layout` for the layout):

* ``fwd(q, k, v, layout, scale) -> (out, lse)``: q (T, Hq, D), k/v (T, Hkv, D) ->
  out (Lq, Hq, D) in segment order (zero rows outside segments), lse (Hq, Lq) float32, the natural-log
  sum of exp(scale * q.k) over the row's keys (-inf for a query with no keys);
* ``bwd(dout, q, k, v, out, lse, layout, scale) -> (dq, dk, dv)``: dout (Lq, Hq, D) ->
  gradients in token space, dq (T, Hq, D), dk/dv (T, Hkv, D), zero for tokens no segment reads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moga._determinism import deterministic_enabled, deterministic_mode
from moga.layout import SegmentLayout

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: SegmentLayout, scale: float, fwd: FwdFn, bwd: BwdFn):  # type: ignore[override]
        out, lse = fwd(q, k, v, layout, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.bwd = layout, scale, bwd
        # Backward runs after the public call returned (on CUDA on an autograd worker thread): carry the
        # forward-time deterministic mode into it.
        ctx.deterministic = deterministic_enabled()
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        with deterministic_mode(ctx.deterministic):
            dq, dk, dv = ctx.bwd(dout.contiguous(), q, k, v, out, lse, ctx.layout, ctx.scale)
        return dq, dk, dv, None, None, None, None


def segment_attention_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    scale: float,
    fwd: FwdFn,
    bwd: BwdFn,
) -> torch.Tensor:
    """Differentiable segment attention through the given kernel pair; returns out (Lq, Hq, D)."""
    return _SegmentAttention.apply(q, k, v, layout, scale, fwd, bwd)
