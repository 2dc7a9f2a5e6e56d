"""Backward segment attention: a delta preprocess, a dk/dv kernel and a dq kernel.

* preprocess: delta[h, p] = sum_d dout[p, h, d] * out[p, h, d] (fp32), for every position.
* dk/dv: program (key tile of a segment, kv head) loops over the segment's query tiles and over the
  query heads sharing the kv head, recomputing p = exp(scale * q.k - lse) and accumulating dk, dv in fp32.
* dq: program (query tile of a segment, query head) loops over the segment's key tiles.

Gradients are returned in token space. When a token row occurs at most once in the layout's index
(``layout.q_unique`` / ``k_unique``), the kernels scatter their tiles straight to token rows of a zeroed
tensor (tokens no segment reads keep exact zeros). Otherwise the kernels write one fp32 row per position
(zero rows for positions after the last segment) and :mod:`reduce` sums them per token in a fixed order.
Neither path uses floating-point atomics: forward and backward are bitwise deterministic.

Head dims: as in :mod:`fwd`, a head dim that is not a tile width is zero-padded on the host (q, k, v, out,
dout; zero columns of q and k change no score, zero columns of v and dout no dp = dout.v) and the gradients'
extra columns, which are zero, are sliced off. Launches run on q's device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moga import _alloc
from moga.kernels.segment_attention import launch
from moga.kernels.segment_attention.configs import config, padded_head_dim
from moga.kernels.segment_attention.fwd import LOG2E, aligned_rows, use_ieee, use_upcast
from moga.kernels.segment_attention.reduce import positions_to_tokens
from moga.kernels.segment_attention.tiles import build_tile_table
from moga.kernels.segment_attention.tl_helpers import load_rows, load_tile, mma, row_ptrs
from moga.layout import SegmentLayout


@triton.jit
def segment_attn_bwd_preprocess_kernel(
    Out, DOut, Delta, num_positions,
    stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    i_m = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    offs_m = i_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < num_positions
    # [BM, D]
    b_o = tl.load(row_ptrs(Out, offs_m, i_h, stride_ot, stride_oh, offs_d), mask=mask_m[:, None], other=0.0)
    # [BM, D]
    b_do = tl.load(row_ptrs(DOut, offs_m, i_h, stride_dot, stride_doh, offs_d), mask=mask_m[:, None], other=0.0)
    # [BM]
    b_delta = tl.sum(b_o.to(tl.float32) * b_do.to(tl.float32), 1)
    tl.store(Delta + i_h * stride_lh + offs_m, b_delta, mask=mask_m)


@triton.jit
def segment_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Q_index, K_index, Tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,
    GROUP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCATTER: tl.constexpr,  # write token rows through K_index (unique keys) instead of per-position rows
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    i_tile = tl.program_id(0)
    i_hk = tl.program_id(1)
    k_start, k_end, q_start, q_end = load_tile(Tiles, i_tile)

    offs_n = k_start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    mask_n = offs_n < k_end
    rows_k = tl.load(K_index + offs_n, mask=mask_n, other=0)
    # Key positions after the last segment (per-position mode only) have no queries and need no rows.
    mask_kv = mask_n & (q_start < q_end)
    # [BN, D]
    b_k = load_rows(K, rows_k, i_hk, stride_kt, stride_kh, offs_d, mask_kv, UPCAST)
    # [BN, D]
    b_v = load_rows(V, rows_k, i_hk, stride_vt, stride_vh, offs_d, mask_kv, UPCAST)
    # [BN, D]
    b_dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    # [BN, D]
    b_dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    for i_g in range(GROUP):
        i_h = (i_hk * GROUP + i_g).to(tl.int64)
        for m0 in range(q_start, q_end, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < q_end
            rows_q = tl.load(Q_index + offs_m, mask=mask_m, other=0)
            # [BM, D]
            b_q = load_rows(Q, rows_q, i_h, stride_qt, stride_qh, offs_d, mask_m, UPCAST)
            # [BM, D]
            b_do = tl.load(row_ptrs(DOut, offs_m, i_h, stride_dot, stride_doh, offs_d), mask=mask_m[:, None], other=0.0)
            if UPCAST:
                b_do = b_do.to(tl.float32)
            # [BM] lse in log2 units; +inf on masked rows makes their probabilities exactly 0
            b_lse = tl.load(Lse + i_h * stride_lh + offs_m, mask=mask_m, other=float("inf")) * 1.4426950408889634
            # [BM]
            b_delta = tl.load(Delta + i_h * stride_lh + offs_m, mask=mask_m, other=0.0)
            # [BN, BM] transposed scores and probabilities
            b_st = mma(b_k, tl.trans(b_q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE) * qk_scale
            b_pt = tl.exp2(b_st - b_lse[None, :])
            b_dv = mma(b_pt.to(b_do.dtype), b_do, b_dv, IEEE)
            # [BN, BM]
            b_dpt = mma(b_v, tl.trans(b_do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), IEEE)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = mma(b_dst.to(b_q.dtype), b_q, b_dk, IEEE)
    b_dk = b_dk * sm_scale

    if SCATTER:
        out_rows = rows_k
    else:
        out_rows = offs_n
    p_dk = row_ptrs(DK, out_rows, i_hk, stride_dkt, stride_dkh, offs_d)
    p_dv = row_ptrs(DV, out_rows, i_hk, stride_dvt, stride_dvh, offs_d)
    tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=mask_n[:, None])
    tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=mask_n[:, None])


@triton.jit
def segment_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Q_index, K_index, Tiles,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
    stride_dqt, stride_dqh,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,
    GROUP: tl.constexpr,  # query heads per kv head
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SCATTER: tl.constexpr,  # write token rows through Q_index (unique queries) instead of per-position rows
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    i_tile = tl.program_id(0)
    i_h = tl.program_id(1).to(tl.int64)
    i_hk = i_h // GROUP
    q_start, q_end, k_start, k_end = load_tile(Tiles, i_tile)

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    mask_m = offs_m < q_end
    rows_q = tl.load(Q_index + offs_m, mask=mask_m, other=0)
    # Query positions without keys (after the last segment) need no inputs: their dq is 0.
    mask_q = mask_m & (k_start < k_end)
    # [BM, D]
    b_q = load_rows(Q, rows_q, i_h, stride_qt, stride_qh, offs_d, mask_q, UPCAST)
    # [BM, D]
    b_do = tl.load(row_ptrs(DOut, offs_m, i_h, stride_dot, stride_doh, offs_d), mask=mask_q[:, None], other=0.0)
    if UPCAST:
        b_do = b_do.to(tl.float32)
    # [BM]
    b_lse = tl.load(Lse + i_h * stride_lh + offs_m, mask=mask_q, other=float("inf")) * 1.4426950408889634
    # [BM]
    b_delta = tl.load(Delta + i_h * stride_lh + offs_m, mask=mask_q, other=0.0)
    # [BM, D]
    b_dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for n0 in range(k_start, k_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < k_end
        rows_k = tl.load(K_index + offs_n, mask=mask_n, other=0)
        # [BN, D]
        b_k = load_rows(K, rows_k, i_hk, stride_kt, stride_kh, offs_d, mask_n, UPCAST)
        # [BN, D]
        b_v = load_rows(V, rows_k, i_hk, stride_vt, stride_vh, offs_d, mask_n, UPCAST)
        # [BM, BN]
        b_s = mma(b_q, tl.trans(b_k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE) * qk_scale
        b_p = tl.where(mask_n[None, :], tl.exp2(b_s - b_lse[:, None]), 0.0)
        # [BM, BN]
        b_dp = mma(b_do, tl.trans(b_v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), IEEE)
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq = mma(b_ds.to(b_k.dtype), b_k, b_dq, IEEE)
    b_dq = b_dq * sm_scale

    if SCATTER:
        out_rows = rows_q
    else:
        out_rows = offs_m
    p_dq = row_ptrs(DQ, out_rows, i_h, stride_dqt, stride_dqh, offs_d)
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=mask_m[:, None])


def _token_grad_buffers(
    unique: bool, num_tokens: int, num_positions: int, heads: int, D: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Where a gradient kernel writes: token rows (zeroed, unique index) or fp32 per-position rows."""
    if unique:
        return _alloc.empty(num_tokens, heads, D, dtype=dtype, device=device).zero_()
    return _alloc.empty(num_positions, heads, D, dtype=torch.float32, device=device)


def _to_tokens(grad: torch.Tensor, unique: bool, index: torch.Tensor, num_tokens: int, dtype: torch.dtype):
    """Per-position fp32 rows -> token rows (deterministic sum over repeated tokens), or token rows unchanged."""
    return grad if unique else positions_to_tokens(grad, index, num_tokens, dtype)


def segment_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    layout: SegmentLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (Lq, Hq, D) contiguous -> dq (T, Hq, D), dk (T, Hkv, D), dv (T, Hkv, D), dtype of q.

    Tokens that no segment reads get zero gradients. D: any head dim in [1, 256]. No host synchronisation.
    """
    head_dim = q.shape[2]
    width = padded_head_dim(head_dim)
    q, k, v, dout, out = (aligned_rows(launch.pad_head_dim(t, width)) for t in (q, k, v, dout, out))
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    Lq, Lk = layout.q_index.numel(), layout.k_index.numel()
    device = q.device
    group = Hq // Hkv
    upcast, ieee = use_upcast(q.dtype), use_ieee(q.dtype)

    delta = _alloc.empty(Hq, Lq, dtype=torch.float32, device=device)
    if Lq > 0:
        cfg = config("preprocess", D, q.dtype, device)
        with launch.device_guard(device):
            segment_attn_bwd_preprocess_kernel[(triton.cdiv(Lq, cfg.block_m), Hq)](
                out, dout, delta, Lq,
                out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
                D=D, BLOCK_M=cfg.block_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

    dk = _token_grad_buffers(layout.k_unique, T, Lk, Hkv, D, k.dtype, device)
    dv = _token_grad_buffers(layout.k_unique, T, Lk, Hkv, D, v.dtype, device)
    if Lk > 0:
        cfg = config("dkdv", D, q.dtype, device)
        tiles = build_tile_table(
            layout.k_offsets, layout.q_offsets, Lk, cfg.block_n, include_tail=not layout.k_unique
        )
        with launch.device_guard(device):
            segment_attn_bwd_dkdv_kernel[(tiles.shape[0], Hkv)](
                q, k, v, dout, lse, delta, dk, dv, layout.q_index, layout.k_index, tiles,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), lse.stride(0),
                dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                scale * LOG2E, scale,
                GROUP=group, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                SCATTER=layout.k_unique, UPCAST=upcast, IEEE=ieee,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

    dq = _token_grad_buffers(layout.q_unique, T, Lq, Hq, D, q.dtype, device)
    if Lq > 0:
        cfg = config("dq", D, q.dtype, device)
        tiles = build_tile_table(
            layout.q_offsets, layout.k_offsets, Lq, cfg.block_m, include_tail=not layout.q_unique
        )
        with launch.device_guard(device):
            segment_attn_bwd_dq_kernel[(tiles.shape[0], Hq)](
                q, k, v, dout, lse, delta, dq, layout.q_index, layout.k_index, tiles,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                dout.stride(0), dout.stride(1), lse.stride(0),
                dq.stride(0), dq.stride(1),
                scale * LOG2E, scale,
                GROUP=group, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                SCATTER=layout.q_unique, UPCAST=upcast, IEEE=ieee,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip

    return (
        launch.unpad_head_dim(_to_tokens(dq, layout.q_unique, layout.q_index, T, q.dtype), head_dim),
        launch.unpad_head_dim(_to_tokens(dk, layout.k_unique, layout.k_index, T, k.dtype), head_dim),
        launch.unpad_head_dim(_to_tokens(dv, layout.k_unique, layout.k_index, T, v.dtype), head_dim),
    )
