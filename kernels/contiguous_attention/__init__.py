"""Contiguous-mode group attention for Hopper: q/k/v already in segment order, tiles loaded by TMA.

* :func:`contiguous_attention_fwd` / :func:`contiguous_attention_bwd`: the kernel pair (out and lse; dq, dk, dv per
  position), used by the ``triton_tma`` backend after it gathers q/k/v into segment order;
* :func:`compile_specs`: the production configurations, for the no-GPU compile check.

The gather-through-index kernels of :mod:`moga.kernels.segment_attention` stay the general path (any layout,
no permuted copies, any head dim, fp32); these kernels need the permuted copies and pay that back with rectangular
TMA tiles, warp specialisation and a persistent longest-first schedule. See docs/kernels.md for the pipeline.
"""

from moga.kernels.contiguous_attention.bwd import contiguous_attention_bwd
from moga.kernels.contiguous_attention.compile_specs import compile_specs
from moga.kernels.contiguous_attention.fwd import contiguous_attention_fwd

__all__ = ["compile_specs", "contiguous_attention_bwd", "contiguous_attention_fwd"]
