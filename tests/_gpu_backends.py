"""Backends that can run CUDA tensors here (empty without a GPU), for tests that also run on a lent GPU."""

from __future__ import annotations

import torch

import moga
from moga.backends import get_backend


def gpu_backends() -> list[str]:
    if not torch.cuda.is_available():
        return []
    probe = torch.zeros(1, 1, 64, device="cuda")
    return [n for n in moga.available_backends() if get_backend(n).unsupported_reason(probe, probe, probe) is None]
