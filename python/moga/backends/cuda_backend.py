"""Compiled CUDA backend: ``moga::segment_attention_fwd/bwd`` from ``csrc/cuda`` (FlashAttention-2 style kernels on
tensor cores: mma.sync m16n8k16, online softmax in fp32, device tile tables, no host synchronisation).

Runs float16 and bfloat16 CUDA tensors with head dim 64 or 128 (the triton backend covers float32 and other head
dims). Available when the extension ``moga._C`` was built with its CUDA part and a GPU is present.
"""

from __future__ import annotations

import torch

from moga import _ops
from moga.backends import _compiled
from moga.backends._autograd import segment_attention_autograd
from moga.layout import SegmentLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
SUPPORTED_HEAD_DIMS = (64, 128)
MAX_QUERY_HEADS = 65535  # the kernels put the query head on gridDim.y


def is_available() -> bool:
    return _ops.ops_available("cuda") and torch.cuda.is_available()


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if not _ops.ops_available("cuda"):
        return f"the compiled extension moga._C has no CUDA kernels (load error: {_ops.load_error()})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cuda":
            return f"{name} is on {t.device}; the cuda backend runs CUDA tensors only"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the cuda backend supports float16 and bfloat16 (use triton for fp32)"
    D = q.shape[-1]
    if D not in SUPPORTED_HEAD_DIMS:
        return f"head dim {D} (q shape {tuple(q.shape)}) is not one of the cuda backend's {SUPPORTED_HEAD_DIMS}"
    if q.dim() == 3 and q.shape[1] > MAX_QUERY_HEADS:
        return f"{q.shape[1]} query heads exceed the cuda backend's limit of {MAX_QUERY_HEADS}"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    return segment_attention_autograd(q, k, v, layout, softmax_scale, _compiled.fwd, _compiled.bwd)
