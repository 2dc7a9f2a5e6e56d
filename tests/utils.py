"""Shared test helpers: relative error against float64 references, backends to test, random inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moga
from moga.backends import get_backend

# Relative-error bounds against the float64 reference, by dtype (DEVELOPERS.md "Standards").
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def cpu_backends() -> list[str]:
    """Every backend that can run CPU tensors in this installation."""
    names = []
    for name in moga.available_backends():
        mod = get_backend(name)
        probe = torch.zeros(1, 1, 64)
        if mod.unsupported_reason(probe, probe, probe) is None:
            names.append(name)
    return names


def qkv(B: int, N: int, Hq: int, Hkv: int, D: int, dtype=torch.float32, requires_grad: bool = True):
    q = torch.randn(B, N, Hq, D, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def as_double_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_(True) for t in tensors]


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention of (B, N, H, D) tensors through PyTorch's SDPA (Hq == Hkv), detached: (B, N, H, D)."""
    return F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
