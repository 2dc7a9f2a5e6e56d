"""One autograd wrapper for every kernel backend of segment attention.

A kernel backend supplies two functions (see :mod:`moga.layout` for the layout):

* ``fwd(q, k, v, layout, scale) -> (out, lse)``: q (T, Hq, D), k/v (T, Hkv, D) ->
  out (Lq, Hq, D) in segment order (zero rows outside segments), lse (Hq, Lq) float32, the natural-log
  sum of exp(scale * q.k) over the row's keys (-inf for a query with no keys);
* ``bwd(dout, q, k, v, out, lse, layout, scale) -> (dq, dk, dv)``: dout (Lq, Hq, D) ->
  gradients in token space, dq (T, Hq, D), dk/dv (T, Hkv, D), zero for tokens no segment reads.

A backend whose kernels run at a fixed tile width (the Triton kernels: 32, 64, 128, 256) passes ``head_width``:
the wrapper zero-pads q, k, v to it for the forward kernel and slices out back to D; backward pads q, k, v, out and
dout again and slices dq, dk, dv. Backward deliberately keeps the caller's unpadded q, k, v and the returned out,
not padded copies: those would be extra tensors (up to 256/D times as large) alive from forward to backward in
every layer and branch, while the re-padding costs a few transient copies, small next to the attention itself.
The softmax scale is the caller's (from the real D) and the zero columns change no score.
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
        out, lse = fwd(*(pad_head_dim(t, width) for t in (q, k, v)), layout, scale)
        # One contiguous copy, not a view of the padded out: the compiled gated un-permute makes its inputs
        # contiguous in forward and again in backward, and callers may .view() the result.
        out = unpad_head_dim(out, D)
        # The unpadded tensors: the caller holds q, k, v and out anyway (see the module docstring).
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.scale, ctx.bwd, ctx.width = layout, scale, bwd, width
        # Backward runs after the public call returned (on CUDA on an autograd worker thread): carry the
        # forward-time deterministic mode into it.
        ctx.deterministic = deterministic_enabled()
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        D, width = q.shape[-1], ctx.width
        # A padded copy is contiguous already; an unpadded dout may need a contiguous copy.
        dout = pad_head_dim(dout, width) if width != D else dout.contiguous()
        q, k, v, out = (pad_head_dim(t, width) for t in (q, k, v, out))
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
