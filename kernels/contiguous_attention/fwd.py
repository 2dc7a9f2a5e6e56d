"""Forward attention over contiguous segments: TMA tiles, a pipelined key loop, a persistent LPT grid.

Contiguous mode: q (Lq, Hq, D), k and v (Lk, Hkv, D) are already in segment order (the permute of the ``varlen``
and ``triton_tma`` backends, or the caller's), so every tile is a rectangle of consecutive rows and is loaded by
the tensor-memory accelerator (TMA) through tensor descriptors instead of per-thread gathers.

Program structure (persistent): ``P`` programs walk the work items ``(tile row, query head)`` of an LPT-ordered
tile table (:mod:`.tiles`), ``i, i + P, ...``. Per work item: descriptors clipped at the segment's ends (so a
tile's rows past its segment load as zeros and its stores stop at the segment's end: no neighbour segment is read
into the softmax or overwritten), one TMA load of the [BM, D] query tile, then the key loop over [BN, D] K and V tiles,
software pipelined over ``NUM_STAGES`` buffers and warp specialised (a producer warp issues the TMA loads into the
buffers, the consumer warpgroup runs the two wgmma and the online softmax); the last, partial tile is masked by an
additive bias folded into the score scaling. Softmax in base 2 with log2(e) folded into the scale, fp32 accumulators.
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
from moga.kernels.segment_attention.tl_helpers import finish_softmax, load_tile, mma


@triton.jit
def attend_tile(
    b_q, desc_k, desc_v, n0, i_hk, k_end, b_max, b_sum, b_acc, qk_scale,
    D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key tile of the online softmax; key rows at or past ``k_end`` are excluded."""
    # [BN, D]
    b_k = desc_k.load([n0, i_hk * D])
    # [BN, D]
    b_v = desc_v.load([n0, i_hk * D])
    if UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    # [BN] 0 for keys of the segment, -inf past its end. Added to the scaled scores it masks them in the same
    # fused multiply-add as the scaling: no separate select, and no second (tail) loop, which would stop Triton
    # from warp-specialising the key loop (it specialises a single loop with no branch after it).
    b_bias = tl.where(n0 + tl.arange(0, BLOCK_N) < k_end, 0.0, float("-inf"))
    # [BM, BN] scores in log2 units
    b_s = mma(b_q, tl.trans(b_k), tl.zeros([b_q.shape[0], BLOCK_N], dtype=tl.float32), UPCAST)
    b_s = b_s * qk_scale + b_bias[None, :]
    # [BM]
    b_new_max = tl.maximum(b_max, tl.max(b_s, 1))
    b_alpha = tl.exp2(b_max - b_new_max)
    # [BM, BN]
    b_p = tl.exp2(b_s - b_new_max[:, None])
    b_sum = b_sum * b_alpha + tl.sum(b_p, 1)
    b_acc = mma(b_p.to(b_v.dtype), b_v, b_acc * b_alpha[:, None], UPCAST)
    return b_new_max, b_sum, b_acc


@triton.jit
def contiguous_attn_fwd_kernel(
    Q, K, V, Out, Lse, Tiles, Num_tiles,
    stride_lh,
    qk_scale,  # softmax scale * log2(e)
    HQ: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per kv head
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
    # Only the non-empty rows (first in the table) are work: no branch around the key loop is then needed, and
    # Triton warp-specialises a loop only outside any branch.
    num_work = tl.load(Num_tiles) * HQ
    for i_work in range(i_prog, num_work, n_prog):
        i_tile = i_work // HQ
        i_h = i_work % HQ
        i_hk = i_h // GROUP
        q_start, q_end, k_start, k_end = load_tile(Tiles, i_tile)
        # Clipped at the segment's ends: rows past them load as zeros, stores stop there (q_end > q_start here;
        # k_end may be 0 in a layout with no keys at all, and a descriptor dimension must be positive).
        desc_q = rows_descriptor(Q, q_end, HQ, D, BLOCK_M)
        desc_o = rows_descriptor(Out, q_end, HQ, D, BLOCK_M)
        k_rows = tl.maximum(k_end, 1)
        desc_k = rows_descriptor(K, k_rows, HKV, D, BLOCK_N)
        desc_v = rows_descriptor(V, k_rows, HKV, D, BLOCK_N)
        # [BM, D]
        b_q = desc_q.load([q_start, i_h * D])
        if UPCAST:
            b_q = b_q.to(tl.float32)
        # [BM]
        b_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # [BM]
        b_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        # [BM, D]
        b_acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for n0 in tl.range(k_start, k_end, BLOCK_N, num_stages=NUM_STAGES, warp_specialize=WARP_SPECIALIZE):
            b_max, b_sum, b_acc = attend_tile(
                b_q, desc_k, desc_v, n0, i_hk, k_end, b_max, b_sum, b_acc, qk_scale, D, BLOCK_N, UPCAST
            )
        b_out, b_lse = finish_softmax(b_acc, b_sum, b_max)
        desc_o.store([q_start, i_h * D], b_out.to(Out.dtype.element_ty))
        offs_m = q_start + tl.arange(0, BLOCK_M)
        tl.store(Lse + i_h.to(tl.int64) * stride_lh + offs_m, b_lse, mask=offs_m < q_end)


def contiguous_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offsets: torch.Tensor,
    k_offsets: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Lq, Hq, D), k/v (Lk, Hkv, D) contiguous in segment order; q_offsets/k_offsets (S + 1,) int64 ->
    out (Lq, Hq, D) dtype of q, lse (Hq, Lq) float32.

    Query rows ``q_offsets[s]:q_offsets[s+1]`` attend to key rows ``k_offsets[s]:k_offsets[s+1]``. Rows at or past
    ``q_offsets[S]`` and queries of segments without keys get zero outputs and lse = -inf. No host synchronisation.
    """
    check_contiguous_inputs(("q", q), ("k", k), ("v", v))
    if k.shape != v.shape or k.shape[2] != q.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    Lq, Hq, D = q.shape
    out = _alloc.empty(Lq, Hq, D, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(Hq, Lq, dtype=torch.float32, device=q.device)
    if Lq == 0:
        return out, lse
    cfg = config("fwd", D)
    tiles, num_tiles = lpt_tile_table(q_offsets, k_offsets, Lq, cfg.block_m, include_tail=True)
    grid = (num_programs(q.device, tiles.shape[0] * Hq),)
    with device_guard(q.device):
        contiguous_attn_fwd_kernel[grid](
            q, k, v, out, lse, tiles, num_tiles, lse.stride(0), scale * LOG2E,
            HQ=Hq, GROUP=Hq // k.shape[1], D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            NUM_STAGES=cfg.num_stages, WARP_SPECIALIZE=cfg.warp_specialize, UPCAST=use_upcast(q.dtype),
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return out, lse
