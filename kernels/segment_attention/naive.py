"""Literal PyTorch segment attention on a SegmentLayout: the definition the fused kernels implement.

One segment at a time, with the offsets read back to the host. Differentiable through autograd (use float64
leaves for reference gradients).
"""

from __future__ import annotations

import torch

from moga.layout import SegmentLayout


def segment_attention_naive(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k/v (T, Hkv, D) -> out (Lq, Hq, D), lse (Hq, Lq), both in q's dtype.

    Query position p of segment s: out[p] = softmax(scale * q[q_index[p]] . k[k_index[j]]) v[k_index[j]] over
    the segment's key positions j; lse[:, p] = logsumexp of those scores. Positions outside every segment, and
    queries of segments without keys: out 0, lse -inf.
    """
    Lq, Hq, D = layout.q_index.numel(), q.shape[1], q.shape[2]
    group = Hq // k.shape[1]
    q_off, k_off = layout.q_offsets.tolist(), layout.k_offsets.tolist()
    out = q.new_zeros(Lq, Hq, D)
    lse = q.new_full((Hq, Lq), float("-inf"))
    for s in range(layout.num_segments):
        qa, qb, ka, kb = q_off[s], q_off[s + 1], k_off[s], k_off[s + 1]
        if qa == qb or ka == kb:
            continue
        qs = q[layout.q_index[qa:qb]]  # [n, Hq, D]
        ks = k[layout.k_index[ka:kb]].repeat_interleave(group, dim=1)  # [m, Hq, D]
        vs = v[layout.k_index[ka:kb]].repeat_interleave(group, dim=1)  # [m, Hq, D]
        scores = torch.einsum("nhd,mhd->hnm", qs, ks) * scale
        out[qa:qb] = torch.einsum("hnm,mhd->nhd", torch.softmax(scores, dim=-1), vs)
        lse[:, qa:qb] = torch.logsumexp(scores, dim=-1)
    return out, lse
