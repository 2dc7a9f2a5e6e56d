"""Forward segment attention (flash-attention 2 style) over gathered token rows.

Program (tile, query head): ``block_m`` query positions of one segment, read through ``q_index``, attend
to the segment's key positions, read through ``k_index`` in ``block_n`` steps, with an online softmax in
fp32 (base 2, log2(e) folded into the scale). The tile table also covers the positions after the last
segment, whose programs find no keys and write zero rows and lse = -inf.

Head dims: the kernel is compiled for D in ``configs.HEAD_DIMS`` (32, 64, 128, 256). Any other head dim in
[1, 256] is zero-padded on the host to its tile width ``configs.padded_head_dim(D)`` (zero columns change no
score; the softmax scale stays the caller's, by default 1/sqrt of the real D) and the output's extra columns are
sliced off, so every head dim runs the very code the compile check measured. Launches run on q's device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moga import _alloc
from moga.kernels.segment_attention import launch
from moga.kernels.segment_attention.configs import config, interpreting, padded_head_dim
from moga.kernels.segment_attention.tiles import build_tile_table
from moga.kernels.segment_attention.tl_helpers import finish_softmax, load_rows, load_tile, mma, row_ptrs
from moga.layout import SegmentLayout

LOG2E = 1.4426950408889634


@triton.jit
def segment_attn_fwd_kernel(
    Q, K, V, Out, Lse, Q_index, K_index, Tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    i_tile = tl.program_id(0)
    i_h = tl.program_id(1)
    i_hk = i_h // GROUP
    q_start, q_end, k_start, k_end = load_tile(Tiles, i_tile)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < q_end
    # Positions after the last segment (no keys) need no query rows: their index entries may be anything.
    mask_q = mask_m & (k_start < k_end)
    rows_q = tl.load(Q_index + offs_m, mask=mask_q, other=0)
    # [BM, D]
    b_q = load_rows(Q, rows_q, i_h, stride_qt, stride_qh, offs_d, mask_q, UPCAST)

    # [BM]
    b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    # [BM]
    b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # [BM, D]
    b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_end
        rows_k = tl.load(K_index + offs_n, mask=mask_n, other=0)
        # [BN, D]
        b_k = load_rows(K, rows_k, i_hk, stride_kt, stride_kh, offs_d, mask_n, UPCAST)
        # [BN, D]
        b_v = load_rows(V, rows_k, i_hk, stride_vt, stride_vh, offs_d, mask_n, UPCAST)
        # [BM, BN] scores in log2 units; every key tile has a valid column, so b_new_max stays finite.
        b_s = mma(b_q, tl.trans(b_k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        b_s = tl.where(mask_n[None, :], b_s, float("-inf"))
        # [BM]
        b_new_max = tl.maximum(b_max, tl.max(b_s, 1))
        b_alpha = tl.exp2(b_max - b_new_max)
        # [BM, BN]
        b_p = tl.exp2(b_s - b_new_max[:, None])
        b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
        b_acc = mma(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], IEEE)
        b_max = b_new_max

    b_out, b_lse = finish_softmax(b_acc, b_sum, b_max)
    p_out = row_ptrs(Out, offs_m, i_h, stride_ot, stride_oh, offs_d)
    tl.store(p_out, b_out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    tl.store(Lse + i_h.to(tl.int64) * stride_lh + offs_m, b_lse, mask=mask_m)


def aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """t (T, H, D) itself if every (token, head) row starts 16-byte aligned with unit stride along D, else an
    aligned contiguous copy (same values). The kernels promise the compiler aligned rows (``row_ptrs``)."""
    size = t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for s in t.stride()[:-1]):
        return t
    return t.clone(memory_format=torch.contiguous_format) if t.is_contiguous() else t.contiguous()


def use_upcast(dtype: torch.dtype) -> bool:
    """The Triton interpreter's bf16 tl.dot is wrong: there (only) bf16 tiles are upcast to fp32."""
    return interpreting() and dtype == torch.bfloat16


def use_ieee(dtype: torch.dtype) -> bool:
    """fp32 inputs get exact fp32 products, never a silent tf32 downgrade."""
    return dtype == torch.float32 or use_upcast(dtype)


def segment_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k/v (T, Hkv, D) -> out (Lq, Hq, D) dtype of q, lse (Hq, Lq) float32.

    out is in segment order with zero rows outside segments; lse is the natural-log sum of
    exp(scale * q.k) over each query's keys, -inf where it has none. D: any head dim in [1, 256] (see the module
    docstring). No host synchronisation.
    """
    head_dim = q.shape[2]
    width = padded_head_dim(head_dim)
    q, k, v = (aligned_rows(launch.pad_head_dim(t, width)) for t in (q, k, v))
    Lq, Hq, D = layout.q_index.numel(), q.shape[1], q.shape[2]
    out = _alloc.empty(Lq, Hq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(Hq, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return launch.unpad_head_dim(out, head_dim), lse
    cfg = config("fwd", D, q.dtype, q.device)
    tiles = build_tile_table(layout.q_offsets, layout.k_offsets, Lq, cfg.block_m, include_tail=True)
    grid = (tiles.shape[0], Hq)
    with launch.device_guard(q.device):
        segment_attn_fwd_kernel[grid](
            q, k, v, out, lse, layout.q_index, layout.k_index, tiles,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            scale * LOG2E,
            GROUP=Hq // k.shape[1], D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            UPCAST=use_upcast(q.dtype), IEEE=use_ieee(q.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return launch.unpad_head_dim(out, head_dim), lse

