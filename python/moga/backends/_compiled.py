"""fwd/bwd of segment attention through the compiled ops ``torch.ops.moga.segment_attention_*``.

Shared by the "cpu" and "cuda" backends (the op dispatches on the tensors' device); see
:mod:`moga.backends._autograd` for the contract. No host synchronisation here: the layout tensors go to the op as
they are.
"""

from __future__ import annotations

import torch

from moga import _ops
from moga.layout import SegmentLayout


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The ops take any token/head strides but need stride 1 over the head dim."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k/v (T, Hkv, D) -> out (Lq, Hq, D) dtype of q, lse (Hq, Lq) float32."""
    _ops.sync_poison_outputs()
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return torch.ops.moga.segment_attention_fwd(
        q, k, v, layout.q_index, layout.q_offsets, layout.k_index, layout.k_offsets, float(scale)
    )


def bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: SegmentLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (Lq, Hq, D) -> dq (T, Hq, D), dk/dv (T, Hkv, D) in token space, dtype of the inputs."""
    _ops.sync_poison_outputs()
    dout, q, k, v = (_last_dim_contiguous(t) for t in (dout, q, k, v))
    return torch.ops.moga.segment_attention_bwd(
        dout,
        q,
        k,
        v,
        out,
        lse,
        layout.q_index,
        layout.q_offsets,
        layout.k_index,
        layout.k_offsets,
        float(scale),
        bool(layout.q_unique),
        bool(layout.k_unique),
    )
