"""Input checks shared by the kernel backends' ``segment_attention`` (one rule, one message, for every backend)."""

from __future__ import annotations

import dataclasses

import torch

from moga.layout import SegmentLayout

_INDEX_FIELDS = ("q_index", "q_offsets", "k_index", "k_offsets")


def check_segment_inputs(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, reason: str | None
) -> SegmentLayout:
    """Raise a clear error unless q (T, Hq, D), k/v (T, Hkv, D) and ``layout`` fit each other and the backend
    (``reason``: its ``unsupported_reason``, None when it can run them). Returns the layout with contiguous index
    tensors (a copy of the dataclass where one was not)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (tokens, heads, headdim), got {tuple(t.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"k/v shape {tuple(k.shape)}, {tuple(v.shape)} do not fit q shape {tuple(q.shape)} "
            "(same tokens and head dim, q heads a multiple of kv heads)"
        )
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if reason is not None:
        raise ValueError(f"{backend} backend cannot run these inputs: {reason}")
    if layout.num_tokens != q.shape[0]:
        raise ValueError(f"layout.num_tokens={layout.num_tokens} but q has {q.shape[0]} token rows")
    for name in _INDEX_FIELDS:
        t = getattr(layout, name)
        if t.dtype != torch.int64 or t.device != q.device or t.dim() != 1:
            raise ValueError(f"layout.{name} must be a 1-D int64 tensor on {q.device}, got {t.dtype} on {t.device}")
        if not t.is_contiguous():
            layout = dataclasses.replace(layout, **{name: t.contiguous()})
    if layout.k_offsets.numel() != layout.q_offsets.numel():
        raise ValueError("layout.q_offsets and layout.k_offsets must have the same length (S + 1)")
    return layout
