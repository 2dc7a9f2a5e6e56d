"""Baselines that moga is measured against, all on the same (1, N, H, D) q/k/v and (1, N) group ids.

* :func:`dense_sdpa`: dense ``scaled_dot_product_attention`` over all N tokens (every speedup is against it);
* :func:`sorted_recipe`: the paper's "kernel-free" recipe in pure torch (argsort by group, gather, one SDPA
  call per group, scatter back);
* :func:`varlen_recipe`: the same recipe at full strength, as the paper states it (argsort by group, gather, one
  ``torch.nn.attention.varlen.varlen_attn`` call over all groups, scatter back); CUDA only;
* :func:`flex_group_attention`: FlexAttention with a mask_mod comparing group ids. Tokens are sorted by group
  first (the permutation is timed too) so the block mask is block-diagonal and FlexAttention can skip the
  empty blocks; on randomly placed tokens every block would be partially filled and no block could be skipped.
  The block mask is built on the device from the group offsets (``BlockMask.from_kv_blocks``), not by
  evaluating the mask on all N^2 pairs, which ``create_block_mask`` would do at 580K tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """(B, N, H, D) -> (B, N, H, D): dense attention, no mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def sorted_recipe(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """Group attention the kernel-free way: q/k/v (1, N, H, D), group_ids (1, N) in [0, num_groups).

    Reads the group sizes back to the host (one synchronisation), as the recipe's per-group calls must.
    """
    if q.shape[0] != 1:
        raise ValueError(f"sorted_recipe takes batch 1, got q of shape {tuple(q.shape)}")
    ids = group_ids[0]
    order = torch.argsort(ids, stable=True)
    sizes = torch.bincount(ids, minlength=num_groups).tolist()
    qs, ks, vs = (t[0, order].transpose(0, 1) for t in (q, k, v))  # [H, N, D], sorted by group
    pieces = []
    for q_g, k_g, v_g in zip(qs.split(sizes, 1), ks.split(sizes, 1), vs.split(sizes, 1), strict=True):
        if q_g.shape[1] > 0:
            pieces.append(F.scaled_dot_product_attention(q_g, k_g, v_g))
    out_sorted = torch.cat(pieces, dim=1).transpose(0, 1)  # [N, H, D]
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out.unsqueeze(0)


def varlen_recipe_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when :func:`varlen_recipe` can run on this device and dtype, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)"
    if device.type != "cuda":
        return f"varlen_attn is CUDA-only, device is {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"varlen_attn takes float16/bfloat16, got {dtype}"
    return None


def varlen_recipe(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """The paper's kernel-free recipe in plain torch: q/k/v (1, N, H, D), group_ids (1, N) in [0, num_groups).

    One stable argsort of the ids, one gather per tensor into group order, one varlen_attn call with
    cu_seqlens = the cumulative group sizes, one scatter back to token order. Reads the largest group back to the
    host (one synchronisation), as the recipe does, so varlen_attn's grid is sized exactly. k/v heads are
    repeated to q's head count (varlen_attn's enable_gqa is torch >= 2.12 only).
    """
    from torch.nn.attention.varlen import varlen_attn

    if q.shape[0] != 1:
        raise ValueError(f"varlen_recipe takes batch 1, got q of shape {tuple(q.shape)}")
    ids = group_ids[0]
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=num_groups)
    cu = torch.zeros(num_groups + 1, dtype=torch.int32, device=q.device)
    torch.cumsum(counts, 0, out=cu[1:])
    max_len = int(counts.max())  # host sync
    rep = q.shape[2] // k.shape[2]
    qs = q[0, order]
    ks, vs = (t[0, order].repeat_interleave(rep, 1) if rep > 1 else t[0, order] for t in (k, v))
    out_sorted = varlen_attn(qs, ks, vs, cu, cu, max_len, max_len)  # (N, H, D), group order
    out = torch.empty_like(out_sorted)
    out[order] = out_sorted
    return out.unsqueeze(0)


def flex_available() -> str | None:
    """None when FlexAttention can be imported, else the reason it cannot."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as exc:
        return f"torch.nn.attention.flex_attention unavailable ({exc})"
    return None


def group_block_mask(sorted_ids: torch.Tensor, block_size: int = 128):
    """BlockMask for tokens sorted by group: q block i meets the kv blocks overlapping its groups' span.

    sorted_ids: (N,) non-decreasing group ids. A (q block, kv block) pair is *full* when both blocks lie
    inside one and the same group, *partial* when their group spans overlap otherwise (mask_mod decides per
    element), and skipped when the spans are disjoint.
    """
    from torch.nn.attention.flex_attention import BlockMask

    n = sorted_ids.numel()
    nb = (n + block_size - 1) // block_size
    starts = torch.arange(nb, device=sorted_ids.device) * block_size
    first = sorted_ids[starts]  # [nb] group of each block's first token
    last = sorted_ids[torch.clamp(starts + block_size - 1, max=n - 1)]  # [nb] group of its last token
    # Blocks are spans [first, last] of group ids; sorted order makes the overlapping kv blocks contiguous.
    overlap = (first[None, :] <= last[:, None]) & (last[None, :] >= first[:, None])  # [nq, nkv]
    uniform = first == last
    full = uniform[:, None] & uniform[None, :] & (first[:, None] == first[None, :])
    if n % block_size:  # the ragged last block is never full: mask_mod must cut off its padding
        full[:, -1] = False
        full[-1, :] = False
    partial = overlap & ~full

    def to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = mask.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], indices[None, None]

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)

    def same_group(b, h, q_idx, kv_idx):
        return sorted_ids[q_idx] == sorted_ids[kv_idx]

    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=same_group, seq_lengths=(n, n)
    )


def make_flex_group_attention(compiled: bool) -> Callable[..., torch.Tensor]:
    """A function (q, k, v, group_ids) -> out, all (1, N, ...), doing FlexAttention inside groups."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def flex_group_attention(q, k, v, group_ids):
        ids = group_ids[0]
        order = torch.argsort(ids, stable=True)
        sorted_ids = ids[order]
        block_mask = group_block_mask(sorted_ids)
        qs, ks, vs = (t[:, order].transpose(1, 2) for t in (q, k, v))  # [1, H, N, D]
        out_sorted = attend(qs, ks, vs, block_mask=block_mask).transpose(1, 2)[0]  # [N, H, D]
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return out.unsqueeze(0)

    return flex_group_attention
