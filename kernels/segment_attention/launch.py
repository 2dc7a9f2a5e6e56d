"""Host-side helpers shared by the segment-attention launchers: the device guard and head-dim padding."""

from __future__ import annotations

import contextlib

import torch

# Re-exported: the launchers pad what they are given (a no-op for tensors the autograd wrapper padded already).
from moga._head_dim import pad_head_dim, unpad_head_dim

__all__ = ["device_guard", "pad_head_dim", "unpad_head_dim"]


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Context in which a Triton launch runs on ``device``. Triton launches on the *current* CUDA device and its
    current stream, so inputs on cuda:1 need cuda:1 made current (and the current device is restored after).
    CPU tensors (the Triton interpreter) need nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
