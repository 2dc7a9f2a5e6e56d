"""Argument validation shared by the public functions.

Every check here reads only shapes, dtypes and devices (host metadata), never tensor contents, so none
of them synchronises with the GPU.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    """Validate flash-attention layout tensors; return (B, N, Hq, Hkv, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seqlen, heads, headdim), got {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, N, Hq, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[1] != N or k.shape[3] != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in batch, seqlen or headdim"
        )
    Hkv = k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a positive multiple of k/v heads ({Hkv})")
    if D == 0:
        raise ValueError("headdim must be positive")
    return B, N, Hq, Hkv, D


def check_group_ids(group_ids: torch.Tensor, B: int, N: int, device: torch.device) -> None:
    if not isinstance(group_ids, torch.Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor, got {type(group_ids).__name__}")
    if group_ids.dtype.is_floating_point or group_ids.dtype.is_complex or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if tuple(group_ids.shape) != (B, N):
        raise ValueError(f"group_ids must have shape (batch, seqlen) = {(B, N)}, got {tuple(group_ids.shape)}")
    if group_ids.device != device:
        raise ValueError(f"group_ids is on {group_ids.device} but q is on {device}")


def check_num_groups(num_groups: int | None, allow_none: bool = True) -> None:
    """A positive int (the number of groups), or None where ``allow_none`` (group_attention's "compact the ids")."""
    if num_groups is None and allow_none:
        return
    if isinstance(num_groups, bool) or not isinstance(num_groups, int):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"num_groups must be {expected}, got {type(num_groups).__name__}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")


def check_router_logits(router_logits: torch.Tensor, B: int, N: int, device: torch.device) -> int:
    """Return M, the number of groups."""
    if not isinstance(router_logits, torch.Tensor):
        raise TypeError(f"router_logits must be a torch.Tensor, got {type(router_logits).__name__}")
    if not router_logits.dtype.is_floating_point:
        raise TypeError(f"router_logits must be a floating-point tensor, got {router_logits.dtype}")
    if router_logits.dim() != 3 or tuple(router_logits.shape[:2]) != (B, N):
        raise ValueError(
            f"router_logits must have shape (batch, seqlen, num_groups) with (batch, seqlen) = {(B, N)}, "
            f"got {tuple(router_logits.shape)}"
        )
    if router_logits.shape[2] < 1:
        raise ValueError("router_logits must have at least one group (last dim >= 1)")
    if router_logits.device != device:
        raise ValueError(f"router_logits is on {router_logits.device} but q is on {device}")
    return router_logits.shape[2]


def check_top_k(top_k: int, M: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= M:
        raise ValueError(f"top_k must lie in [1, num_groups={M}], got {top_k}")


def softmax_scale_or_default(softmax_scale: float | None, D: int) -> float:
    if softmax_scale is None:
        return D**-0.5
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number, got {softmax_scale}")
    return scale
