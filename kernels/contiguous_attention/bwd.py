"""Backward attention over contiguous segments: delta preprocess, dq and dk/dv kernels with TMA tiles.

Same contract and program structure as :mod:`.fwd` (persistent LPT grid, descriptors clipped at the segment's
ends, one warp-specialised loop per work item):

* preprocess: delta[h, p] = sum_d dout[p, h, d] * out[p, h, d] (fp32), by the segment package's kernel;
* dq: work item (query tile, query head) loops over the segment's key tiles: p = 2^(s - lse2) recomputed,
  dp = dout v^T, ds = p (dp - delta), dq += ds k;
* dk/dv: work item (key tile, kv head) loops over the segment's query tiles of each query head sharing the kv head,
  flattened into ONE loop (Triton warp-specialises a single loop), accumulating dv += p^T dout, dk += ds^T q.

q, k, v and dout tiles are loaded by TMA; the [BM] rows of lse and delta by plain masked loads, which Triton 3.6-3.8
can warp-specialise only when the tile is not split across two consumer warpgroups (its data partitioner rejects
them): hence 64-row tiles on the split dimension in the backward tables. Query rows past a segment's end load as
zeros (q, dout, lse, delta alike), which makes their contribution to dk and dv exactly zero; key rows past it are
masked by an additive -inf bias on the scores (dq) or never stored (dk/dv: the descriptor stops at the segment's
end). Gradients are returned per position (segment order); nothing is accumulated across programs, so there are
no atomics and results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moga import _alloc
from moga.kernels.contiguous_attention.configs import config, num_programs
from moga.kernels.contiguous_attention.launch import (
    LOG2E,
    check_contiguous_inputs,
    device_guard,
    rows_descriptor,
    use_upcast,
)
from moga.kernels.contiguous_attention.tiles import lpt_tile_table
from moga.kernels.segment_attention.bwd import segment_attn_bwd_preprocess_kernel
from moga.kernels.segment_attention.configs import config as segment_config
from moga.kernels.segment_attention.tl_helpers import load_tile, mma


@triton.jit
def contiguous_attn_bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Tiles, Num_tiles,
    stride_lh,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    HKV: tl.constexpr = HQ // GROUP
    i_prog = tl.program_id(0)
    n_prog = tl.num_programs(0)
    num_work = tl.load(Num_tiles) * HQ
    for i_work in range(i_prog, num_work, n_prog):
        i_tile = i_work // HQ
        i_h = i_work % HQ
        i_hk = i_h // GROUP
        q_start, q_end, k_start, k_end = load_tile(Tiles, i_tile)
        desc_q = rows_descriptor(Q, q_end, HQ, D, BLOCK_M)
        desc_do = rows_descriptor(DOut, q_end, HQ, D, BLOCK_M)
        desc_dq = rows_descriptor(DQ, q_end, HQ, D, BLOCK_M)
        k_rows = tl.maximum(k_end, 1)
        desc_k = rows_descriptor(K, k_rows, HKV, D, BLOCK_N)
        desc_v = rows_descriptor(V, k_rows, HKV, D, BLOCK_N)
        offs_m = q_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < q_end
        # [BM, D]
        b_q = desc_q.load([q_start, i_h * D])
        # [BM, D]
        b_do = desc_do.load([q_start, i_h * D])
        if UPCAST:
            b_q = b_q.to(tl.float32)
            b_do = b_do.to(tl.float32)
        # [BM] lse in log2 units (finite: the loop below runs only when the segment has keys). Rows past the
        # segment load 0 here and zeros for q and dout: their ds is 0, and they are never stored.
        b_lse2 = tl.load(Lse + i_h.to(tl.int64) * stride_lh + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        # [BM]
        b_delta = tl.load(Delta + i_h.to(tl.int64) * stride_lh + offs_m, mask=mask_m, other=0.0)
        # [BM, D]
        b_dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for n0 in tl.range(k_start, k_end, BLOCK_N, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
            # [BN, D]
            b_k = desc_k.load([n0, i_hk * D])
            # [BN, D]
            b_v = desc_v.load([n0, i_hk * D])
            if UPCAST:
                b_k = b_k.to(tl.float32)
                b_v = b_v.to(tl.float32)
            # [BN] 0 inside the segment, -inf past its end (folded into the scaling, as in the forward)
            b_bias = tl.where(n0 + tl.arange(0, BLOCK_N) < k_end, 0.0, float("-inf"))
            # [BM, BN]
            b_s = mma(b_q, tl.trans(b_k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
            b_p = tl.exp2(b_s * qk_scale + b_bias[None, :] - b_lse2[:, None])
            # [BM, BN]
            b_dp = mma(b_do, tl.trans(b_v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST)
            b_ds = b_p * (b_dp - b_delta[:, None])
            b_dq = mma(b_ds.to(b_k.dtype), b_k, b_dq, UPCAST)
        desc_dq.store([q_start, i_h * D], (b_dq * sm_scale).to(DQ.dtype.element_ty))


@triton.jit
def contiguous_attn_bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Tiles, Num_tiles,
    stride_lh,
    qk_scale,  # softmax scale * log2(e)
    sm_scale,
    HQ: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    HKV: tl.constexpr = HQ // GROUP
    i_prog = tl.program_id(0)
    n_prog = tl.num_programs(0)
    num_work = tl.load(Num_tiles) * HKV
    for i_work in range(i_prog, num_work, n_prog):
        i_tile = i_work // HKV
        i_hk = i_work % HKV
        k_start, k_end, q_start, q_end = load_tile(Tiles, i_tile)
        desc_k = rows_descriptor(K, k_end, HKV, D, BLOCK_N)
        desc_v = rows_descriptor(V, k_end, HKV, D, BLOCK_N)
        desc_dk = rows_descriptor(DK, k_end, HKV, D, BLOCK_N)
        desc_dv = rows_descriptor(DV, k_end, HKV, D, BLOCK_N)
        q_rows = tl.maximum(q_end, 1)
        desc_q = rows_descriptor(Q, q_rows, HQ, D, BLOCK_M)
        desc_do = rows_descriptor(DOut, q_rows, HQ, D, BLOCK_M)
        # [BN, D]
        b_k = desc_k.load([k_start, i_hk * D])
        # [BN, D]
        b_v = desc_v.load([k_start, i_hk * D])
        if UPCAST:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)
        # [BN, D]
        b_dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        # [BN, D]
        b_dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        n_q_tiles = tl.cdiv(q_end - q_start, BLOCK_M)
        # One loop over (query head of this kv head, query tile): a single loop is what Triton warp-specialises.
        for i_it in tl.range(0, GROUP * n_q_tiles, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
            i_h = i_hk * GROUP + i_it // n_q_tiles
            m0 = q_start + (i_it % n_q_tiles) * BLOCK_M
            # [BM, D]
            b_q = desc_q.load([m0, i_h * D])
            # [BM, D]
            b_do = desc_do.load([m0, i_h * D])
            if UPCAST:
                b_q = b_q.to(tl.float32)
                b_do = b_do.to(tl.float32)
            # [BM] lse in log2 units (finite: these queries have this key tile). Rows past the segment load 0,
            # with zero q and dout rows: p = 1 there but multiplies zero dout rows and gives ds = 0 exactly.
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < q_end
            b_lse2 = tl.load(Lse + i_h.to(tl.int64) * stride_lh + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
            # [BM]
            b_delta = tl.load(Delta + i_h.to(tl.int64) * stride_lh + offs_m, mask=mask_m, other=0.0)
            # [BN, BM] transposed scores and probabilities
            b_st = mma(b_k, tl.trans(b_q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST)
            b_pt = tl.exp2(b_st * qk_scale - b_lse2[None, :])
            b_dv = mma(b_pt.to(b_do.dtype), b_do, b_dv, UPCAST)
            # [BN, BM]
            b_dpt = mma(b_v, tl.trans(b_do), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST)
            b_dst = b_pt * (b_dpt - b_delta[None, :])
            b_dk = mma(b_dst.to(b_q.dtype), b_q, b_dk, UPCAST)
        desc_dk.store([k_start, i_hk * D], (b_dk * sm_scale).to(DK.dtype.element_ty))
        desc_dv.store([k_start, i_hk * D], b_dv.to(DV.dtype.element_ty))


def contiguous_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dout (Lq, Hq, D) contiguous, the forward's q, k, v, out, lse and offsets -> dq (Lq, Hq, D), dk and dv
    (Lk, Hkv, D), dtype of q, per position (segment order). Rows outside every segment get zero gradients.
    No host synchronisation, no atomics."""
    check_contiguous_inputs(("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out))
    Lq, Hq, D = q.shape
    Lk, Hkv = k.shape[0], k.shape[1]
    device = q.device
    upcast = use_upcast(q.dtype)
    common = dict(HQ=Hq, GROUP=Hq // Hkv, D=D, UPCAST=upcast)

    delta = _alloc.empty(Hq, Lq, dtype=torch.float32, device=device)
    dq = _alloc.empty(Lq, Hq, D, dtype=q.dtype, device=device)
    dk = _alloc.empty(Lk, Hkv, D, dtype=k.dtype, device=device)
    dv = _alloc.empty(Lk, Hkv, D, dtype=v.dtype, device=device)
    with device_guard(device):
        if Lq > 0:
            # The segment package's delta kernel (any row strides), launched with its configuration.
            pre = segment_config("preprocess", D, q.dtype, device)
            segment_attn_bwd_preprocess_kernel[(triton.cdiv(Lq, pre.block_m), Hq)](
                out, dout, delta, Lq, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
                D=D, BLOCK_M=pre.block_m, num_warps=pre.num_warps, num_stages=pre.num_stages,
            )  # fmt: skip
            cfg = config("dq", D)
            tiles, num_tiles = lpt_tile_table(q_offsets, k_offsets, Lq, cfg.block_m, include_tail=True)
            contiguous_attn_bwd_dq_kernel[(num_programs(device, tiles.shape[0] * Hq),)](
                q, k, v, dout, lse, delta, dq, tiles, num_tiles, lse.stride(0), scale * LOG2E, scale,
                **common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps,
            )  # fmt: skip
        if Lk > 0:
            cfg = config("dkdv", D)
            tiles, num_tiles = lpt_tile_table(k_offsets, q_offsets, Lk, cfg.block_n, include_tail=True)
            contiguous_attn_bwd_dkdv_kernel[(num_programs(device, tiles.shape[0] * Hkv),)](
                q, k, v, dout, lse, delta, dk, dv, tiles, num_tiles, lse.stride(0), scale * LOG2E, scale,
                **common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                WARP_SPECIALIZE=cfg.warp_specialize, num_warps=cfg.num_warps,
            )  # fmt: skip
    return dq, dk, dv
