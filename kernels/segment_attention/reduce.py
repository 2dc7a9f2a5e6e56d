"""Deterministic sum of per-position gradient rows into token rows.

When a token row can occur at several positions of a layout (top_k > 1, context keys), the gradient kernels
write one fp32 row per position. Here the positions are stably sorted by token on the device, and one program
per (token, block of the row) adds that token's rows in this fixed order: no floating-point atomics, so the
result is bitwise reproducible, and every token row (zero for tokens at no position) is written. Rows are
flat (H * D elements, any head dim); the launch runs on the gradient's device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moga import _alloc
from moga.kernels.segment_attention import launch

BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def segment_attn_bwd_reduce_kernel(
    Grad, Order, Starts, Out,
    row_size,  # H * D elements per row
    BLOCK: tl.constexpr,
):  # fmt: skip
    i_t = tl.program_id(0).to(tl.int64)
    i_b = tl.program_id(1)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    mask = offs < row_size
    start = tl.load(Starts + i_t)
    end = tl.load(Starts + i_t + 1)
    # [BLOCK]
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(start, end):
        position = tl.load(Order + j)
        b_acc += tl.load(Grad + position * row_size + offs, mask=mask, other=0.0)
    tl.store(Out + i_t * row_size + offs, b_acc.to(Out.dtype.element_ty), mask=mask)


def positions_to_tokens(
    grad: torch.Tensor, index: torch.Tensor, num_tokens: int, dtype: torch.dtype
) -> torch.Tensor:
    """grad (L, H, D) contiguous fp32 rows of positions, index (L,) their token rows -> (T, H, D) in dtype.

    Token t gets the sum of the rows of the positions p with index[p] == t, added in increasing p.
    """
    L, H, D = grad.shape
    out = _alloc.empty(num_tokens, H, D, dtype=dtype, device=grad.device)
    if num_tokens == 0:
        return out
    sorted_index, order = torch.sort(index, stable=True)
    tokens = torch.arange(num_tokens + 1, dtype=torch.int64, device=grad.device)
    starts = torch.searchsorted(sorted_index, tokens)  # (T + 1,) token t's positions: order[starts[t]:starts[t+1]]
    grid = (num_tokens, triton.cdiv(H * D, BLOCK))
    with launch.device_guard(grad.device):
        segment_attn_bwd_reduce_kernel[grid](grad, order, starts, out, H * D, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
