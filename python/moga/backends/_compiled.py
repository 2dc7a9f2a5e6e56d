"""fwd/bwd of segment attention through the compiled ops ``torch.ops.moga.segment_attention_*``.

Shared by the "cpu" and "cuda" backends (the op dispatches on the tensors' device); see
:mod:`moga.backends._autograd` for the contract. No host synchronisation here: the layout tensors go to the op as
they are.
"""

from __future__ import annotations

import torch

from moga import _ops
from moga._determinism import deterministic_enabled
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
    # A list, not a generator: torch.compile traces this inside the autograd backward, where unpacking a
    # generator expression fails the trace ("generator already executing").
    dout, q, k, v = [_last_dim_contiguous(t) for t in (dout, q, k, v)]
    repeated = not (layout.q_unique and layout.k_unique)
    if repeated and q.device.type == "cuda" and deterministic_enabled():
        # The CUDA kernels sum the gradients of repeated tokens with float atomics (order varies run to run).
        return bwd_through_positions(dout, q, k, v, out, lse, layout, scale)
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


def bwd_through_positions(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: SegmentLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward of :func:`bwd` with a fixed summation order for tokens that occur at several positions.

    The op runs on per-position copies of q/k/v (identity indices, so every gradient row has one writer), and
    the rows of each token are then summed in increasing position order. Costs a copy of q/k/v per position;
    used for deterministic mode when a layout repeats tokens (top_k > 1, context frames).
    """
    from moga.kernels.segment_attention.reduce import positions_to_tokens  # needs triton

    T = q.shape[0]
    q_pos, k_pos, v_pos = q[layout.q_index], k[layout.k_index], v[layout.k_index]
    ident_q = torch.arange(layout.q_index.numel(), dtype=torch.int64, device=q.device)
    ident_k = torch.arange(layout.k_index.numel(), dtype=torch.int64, device=q.device)
    dq_pos, dk_pos, dv_pos = torch.ops.moga.segment_attention_bwd(
        dout, q_pos, k_pos, v_pos, out, lse, ident_q, layout.q_offsets, ident_k, layout.k_offsets,
        float(scale), True, True,
    )
    return (
        positions_to_tokens(dq_pos.float().contiguous(), layout.q_index, T, q.dtype),
        positions_to_tokens(dk_pos.float().contiguous(), layout.k_index, T, k.dtype),
        positions_to_tokens(dv_pos.float().contiguous(), layout.k_index, T, v.dtype),
    )
