"""Compiled CPU backend: ``moga::segment_attention_fwd/bwd`` from ``csrc/cpu`` (tiled online softmax on BLAS,
parallel over (segment, tile, kv head) with at::parallel_for). fp16/bf16 inputs accumulate in float32, float64
inputs in float64. Available when the extension ``moga._C`` was built.
"""

from __future__ import annotations

import torch

from moga import _ops
from moga.backends import _compiled
from moga.backends._autograd import segment_attention_autograd
from moga.layout import SegmentLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available() -> bool:
    return _ops.ops_available("cpu")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if not is_available():
        return f"the compiled extension moga._C with CPU kernels is not loaded ({_ops.load_error()})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpu backend runs CPU tensors only"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the cpu backend supports float16, bfloat16, float32 and float64"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    return segment_attention_autograd(q, k, v, layout, softmax_scale, _compiled.fwd, _compiled.bwd)
