"""Helpers shared by the contiguous kernels: device guard, TMA scratch allocator, input checks, descriptors."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from moga.kernels.contiguous_attention.configs import DTYPES, HEAD_DIMS
from moga.kernels.segment_attention import launch as segment_launch
from moga.kernels.segment_attention.fwd import LOG2E, use_upcast

__all__ = ["LOG2E", "check_contiguous_inputs", "device_guard", "rows_descriptor", "use_upcast"]


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Device-side tensor descriptors are written to global scratch memory that Triton asks the allocator for.
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """The segment kernels' device guard (launch on ``device``, not the current CUDA device), with the
    descriptor scratch allocator installed first."""
    if device.type == "cuda":
        triton.set_allocator(_tma_scratch)
    return segment_launch.device_guard(device)


def check_contiguous_inputs(*tensors: tuple[str, torch.Tensor]) -> None:
    """Every (name, tensor): 3-D (rows, heads, D), contiguous, 16-byte aligned base, a supported dtype and head
    dim (TMA needs a 16-byte aligned base and 16-byte multiple row strides), fewer than 2^31 rows."""
    for name, t in tensors:
        if t.dim() != 3:
            raise ValueError(f"{name} must have shape (rows, heads, headdim), got {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise TypeError(f"{name}: contiguous kernels take float16 or bfloat16, got {t.dtype}")
        if t.shape[-1] not in HEAD_DIMS:
            raise ValueError(f"{name}: contiguous kernels support head dims {HEAD_DIMS}, got {t.shape[-1]}")
        if not t.is_contiguous() or t.data_ptr() % 16:
            raise ValueError(f"{name} must be contiguous with a 16-byte aligned base")
        if t.shape[0] >= 2**31:
            raise ValueError(f"{name} has {t.shape[0]} rows: TMA coordinates are 32-bit (< 2^31 rows)")


@triton.jit
def rows_descriptor(Base, rows, HEADS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
    """A TMA descriptor over the first ``rows`` rows of a contiguous (L, HEADS, D) tensor, viewed as (rows,
    HEADS * D), in [BLOCK, D] tiles (one head's columns): loads past ``rows`` give zeros, stores stop there."""
    return tl.make_tensor_descriptor(Base, shape=[rows, HEADS * D], strides=[HEADS * D, 1], block_shape=[BLOCK, D])
