"""One autograd wrapper for every kernel backend of segment attention.

A kernel backend supplies two functions (see :mod:`moga.layout` for the layout):

* ``fwd(q, k, v, layout, scale) -> (out, lse)``: q (T, Hq, D), k/v (T, Hkv, D) ->
  out (Lq, Hq, D) in segment order (zero rows outside segments), lse (Hq, Lq) float32, the natural-log
  sum of exp(scale * q.k) over the row's keys (-inf for a query with no keys);
* ``bwd(dout, q, k, v, out, lse, layout, scale) -> (dq, dk, dv)``: dout (Lq, Hq, D) ->
  gradients in token space, dq (T, Hq, D), dk/dv (T, Hkv, D), zero for tokens no segment reads.

A backend whose kernels run at a fixed tile width (the Triton kernels: 32, 64, 128, 256) passes ``head_width``:
the wrapper then zero-pads q, k, v to it once in forward (those padded copies, and the padded out, are what
backward gets: nothing is padded twice), dout once in backward, and slices out, dq, dk, dv back to D once each.
The softmax scale is the caller's (from the real D) and the zero columns change no score, so results are those of
padding inside each kernel call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moga._determinism import deterministic_enabled, deterministic_mode
from moga._head_dim import pad_head_dim, unpad_head_dim
from moga.layout import SegmentLayout

FwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BwdFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, q, k, v, layout: SegmentLayout, scale: float, fwd: FwdFn, bwd: BwdFn, head_width: int | None
    ):
        D = q.shape[-1]
        width = D if head_width is None else head_width
        q, k, v = (pad_head_dim(t, width) for t in (q, k, v))
        out, lse = fwd(q, k, v, layout, scale)
        # Backward reads the padded tensors (out too: its extra columns are the kernel's exact zeros).
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.bwd, ctx.head_dim = layout, scale, bwd, D
        # Backward runs after the public call returned (on CUDA on an autograd worker thread): carry the
        # forward-time deterministic mode into it.
        ctx.deterministic = deterministic_enabled()
        # One contiguous copy, not a view of the padded out: the compiled gated un-permute makes its inputs
        # contiguous in forward and again in backward, and callers may .view() the result.
        return unpad_head_dim(out, D)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        D, width = ctx.head_dim, q.shape[-1]
        # The padded copy is contiguous already; only an unpadded dout may need a contiguous copy.
        dout = pad_head_dim(dout, width) if width != D else dout.contiguous()
        with deterministic_mode(ctx.deterministic):
            dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, ctx.layout, ctx.scale)
        return unpad_head_dim(dq, D), unpad_head_dim(dk, D), unpad_head_dim(dv, D), None, None, None, None, None


def segment_attention_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    scale: float,
    fwd: FwdFn,
    bwd: BwdFn,
    head_width: int | None = None,
) -> torch.Tensor:
    """Differentiable segment attention through the given kernel pair; returns out (Lq, Hq, D).

    head_width: None (the kernels take any D), or the width >= D the kernels run at (see the module docstring).
    """
    return _SegmentAttention.apply(q, k, v, layout, scale, fwd, bwd, head_width)
