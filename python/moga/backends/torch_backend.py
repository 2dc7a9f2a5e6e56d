"""Pure-PyTorch backend: one ``scaled_dot_product_attention`` call per segment.

Readable, runs on any device, differentiable through autograd. It reads segment offsets back to the host
(one synchronisation per call), so it is the reference-grade path, not the fast one.
fp16/bf16 inputs are computed in float32 on the CPU. Autocast is switched off around SDPA: like the kernel
backends (custom ops, which autocast does not touch), it computes in the inputs' dtype, so an autocast region
never makes the choice of backend change the numerics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moga.layout import SegmentLayout


def is_available() -> bool:
    return True


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if q.device.type == "meta":
        return "meta tensors hold no data (this backend reads segment offsets on the host)"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    Lq, Hq, D = layout.q_index.numel(), q.shape[1], q.shape[2]
    group = Hq // k.shape[1]
    upcast = q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16)
    q_off = layout.q_offsets.tolist()
    k_off = layout.k_offsets.tolist()
    pieces = []
    for s in range(layout.num_segments):
        qa, qb, ka, kb = q_off[s], q_off[s + 1], k_off[s], k_off[s + 1]
        if qa == qb:
            continue
        if ka == kb:  # no keys: output zero
            pieces.append(q.new_zeros(qb - qa, Hq, D))
            continue
        qs = q[layout.q_index[qa:qb]].transpose(0, 1)  # [Hq, n, D]
        ks = k[layout.k_index[ka:kb]].transpose(0, 1)  # [Hkv, m, D]
        vs = v[layout.k_index[ka:kb]].transpose(0, 1)
        if group > 1:
            ks = ks.repeat_interleave(group, dim=0)
            vs = vs.repeat_interleave(group, dim=0)
        if upcast:
            qs, ks, vs = qs.float(), ks.float(), vs.float()
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=softmax_scale)
        pieces.append(out.transpose(0, 1).to(q.dtype))
    tail = Lq - q_off[-1]
    if tail > 0 or not pieces:
        pieces.append(q.new_zeros(tail, Hq, D))
    return torch.cat(pieces, dim=0)
