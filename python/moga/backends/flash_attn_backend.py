"""The paper's kernel-free recipe through FlashAttention-2's varlen kernel (optional: needs ``flash_attn``).

Gathers q/k/v rows in segment order, calls ``flash_attn_varlen_func`` with cu_seqlens = the layout's offsets,
and returns the output in segment order (the caller un-permutes). Differentiable through flash_attn's own
autograd function and the gathers. Only self-attention layouts (every segment's keys are its queries) map
onto one varlen call here; other layouts are refused with a reason.

It reads the longest segment back to the host (``max_seqlen``, one synchronisation per call), as the recipe
does; it is a baseline to measure moga's kernels against, not a fast path.
"""

from __future__ import annotations

import functools
import importlib

import torch

from moga.layout import SegmentLayout


@functools.cache
def _varlen_func():
    """flash_attn.flash_attn_varlen_func, or None when flash_attn is not importable (or broken)."""
    try:
        return importlib.import_module("flash_attn").flash_attn_varlen_func
    except Exception:  # an ABI-mismatched build raises OSError/RuntimeError at import, not only ImportError
        return None


def is_available() -> bool:
    return _varlen_func() is not None


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None = None
) -> str | None:
    if q.device.type != "cuda":
        return f"flash_attn runs on CUDA tensors only, got {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn takes float16/bfloat16, got {q.dtype}"
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return f"flash_attn needs headdim <= 256 and a multiple of 8, got {q.shape[-1]}"
    if layout is not None and not layout.same_qk:
        return "the flash_attn recipe needs each segment's keys to be its queries (layout.same_qk)"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows past the last segment are zero."""
    reason = unsupported_reason(q, k, v, layout)
    if reason is not None:
        raise ValueError(f"flash_attn backend cannot run q {tuple(q.shape)} {q.dtype} on {q.device}: {reason}")
    varlen = _varlen_func()
    if varlen is None:
        raise ValueError("flash_attn backend: flash_attn is not importable")
    return run_varlen(q, k, v, layout, softmax_scale, varlen)


def run_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float, varlen
) -> torch.Tensor:
    """The recipe around a ``flash_attn_varlen_func``-compatible ``varlen`` (separate so tests can pass a
    reference implementation of that documented interface). Shapes as in :func:`segment_attention`."""
    idx = layout.q_index
    cu_seqlens = layout.q_offsets.to(torch.int32)
    max_seqlen = int(torch.diff(layout.q_offsets).max()) if layout.num_segments > 0 else 0  # host sync
    qs, ks, vs = q[idx], k[idx], v[idx]  # (Lq, H, D), segment order; flash_attn handles Hq = g * Hkv itself
    out = varlen(qs, ks, vs, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale=softmax_scale, causal=False)
    # flash_attn leaves rows past cu_seqlens[-1] (positions outside every segment) unwritten: zero them.
    inside = torch.arange(idx.numel(), device=q.device) < layout.q_offsets[-1]
    return torch.where(inside[:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
