"""The paper's kernel-free recipe through xFormers (optional: needs ``xformers``).

Gathers q/k/v rows in segment order and runs ``xformers.ops.memory_efficient_attention`` with a
``BlockDiagonalMask`` of the segment lengths; returns the output in segment order (the caller un-permutes).
Grouped-query heads use xFormers' 5-D (batch, tokens, kv heads, queries per kv head, D) layout, with k/v
broadcast (expanded, not copied) over the queries of each kv head. Differentiable through xFormers' autograd.

The mask is built from host lists of segment lengths (one synchronisation per call), as the recipe does;
it is a baseline, not a fast path. Only self-attention layouts (layout.same_qk) are supported.
"""

from __future__ import annotations

import functools
import importlib

import torch

from moga.layout import SegmentLayout


@functools.cache
def _xformers_ops():
    """(memory_efficient_attention, BlockDiagonalMask), or None when xformers is not importable (or broken)."""
    try:
        ops = importlib.import_module("xformers.ops")
        attn_bias = importlib.import_module("xformers.ops.fmha.attn_bias")
        return ops.memory_efficient_attention, attn_bias.BlockDiagonalMask
    except Exception:  # a build for another torch raises OSError/RuntimeError/AttributeError at import
        return None


def is_available() -> bool:
    return _xformers_ops() is not None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None = None
) -> str | None:
    if q.device.type != "cuda":
        return f"xformers memory_efficient_attention runs on CUDA tensors here, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"xformers takes float16/bfloat16/float32, got {q.dtype}"
    if layout is not None and not layout.same_qk:
        return "the xformers recipe needs each segment's keys to be its queries (layout.same_qk)"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows past the last segment are zero."""
    reason = unsupported_reason(q, k, v, layout)
    if reason is not None:
        raise ValueError(f"xformers backend cannot run q {tuple(q.shape)} {q.dtype} on {q.device}: {reason}")
    ops = _xformers_ops()
    if ops is None:
        raise ValueError("xformers backend: xformers is not importable")
    return run_block_diagonal(q, k, v, layout, softmax_scale, *ops)


def run_block_diagonal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: SegmentLayout,
    softmax_scale: float,
    attention,
    block_diagonal_mask,
) -> torch.Tensor:
    """The recipe around ``memory_efficient_attention``/``BlockDiagonalMask``-compatible callables (separate so
    tests can pass reference implementations of that documented interface). Shapes as in :func:`segment_attention`."""
    Lq, Hq, D = layout.q_index.numel(), q.shape[1], q.shape[2]
    Hkv = k.shape[1]
    lengths = torch.diff(layout.q_offsets).tolist()  # host sync: the mask is built from host lists
    used = sum(lengths)
    nonempty = [n for n in lengths if n > 0]
    tail = q.new_zeros(Lq - used, Hq, D)  # positions past the last segment
    if used == 0:
        return tail
    idx = layout.q_index[:used]
    group = Hq // Hkv
    qs = q[idx].view(1, used, Hkv, group, D)  # [1, L, G, H/G, D]
    ks = k[idx].view(1, used, Hkv, 1, D).expand(1, used, Hkv, group, D)
    vs = v[idx].view(1, used, Hkv, 1, D).expand(1, used, Hkv, group, D)
    mask = block_diagonal_mask.from_seqlens(nonempty)
    seg_out = attention(qs, ks, vs, attn_bias=mask, scale=softmax_scale).reshape(used, Hq, D)
    return torch.cat([seg_out, tail], dim=0) if used < Lq else seg_out
