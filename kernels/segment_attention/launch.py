"""Host-side helpers shared by the segment-attention launchers: the device guard and head-dim padding."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Context in which a Triton launch runs on ``device``. Triton launches on the *current* CUDA device and its
    current stream, so inputs on cuda:1 need cuda:1 made current (and the current device is restored after).
    CPU tensors (the Triton interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


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
