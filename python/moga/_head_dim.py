"""Zero-padding of the head dim to a kernel's tile width, and the slice back (plain torch, no Triton).

Used once per autograd call by :mod:`moga.backends._autograd` (``head_width``) and, for direct callers of the
Triton launchers, by :mod:`moga.kernels.segment_attention.launch` (there a no-op on already padded tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_head_dim(t: torch.Tensor, width: int) -> torch.Tensor:
    """t (..., D) itself when D == width, else a contiguous (..., width) copy with zeros in columns D..width-1.

    Zero columns leave every q.k score unchanged, give zero output / gradient columns beyond D (sliced off by
    :func:`unpad_head_dim`), and make rows of a power-of-two width >= 32 elements that start 16-byte aligned.
    """
    D = t.shape[-1]
    if D == width:
        return t
    if D > width:
        raise ValueError(f"head dim {D} is wider than the tile width {width}")
    return F.pad(t, (0, width - D)).contiguous()


def unpad_head_dim(t: torch.Tensor, D: int) -> torch.Tensor:
    """The first D columns of t (..., width) as a contiguous tensor (t itself when width == D)."""
    return t if t.shape[-1] == D else t[..., :D].contiguous()
