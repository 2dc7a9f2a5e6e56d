"""Triton TMA backend: permute into segment order, then moga's Hopper kernels on contiguous tiles.

The gather-through-index kernels of the ``triton`` backend read q/k/v rows through index tensors, which rules out
the tensor-memory accelerator (TMA). This backend pays for one gathered copy of q, k and v (as the ``varlen``
backend does; ~1% of the attention time at 580K tokens by the issue's estimate, 3 x L x H x D extra elements kept
for backward) and runs :mod:`moga.kernels.contiguous_attention`: TMA tiles clipped at the segments' ends, a
warp-specialised, software-pipelined key loop (wgmma, producer/consumer warpgroups) and a persistent grid ordered
longest-segment-first. Gradients come back per position and flow to token rows through the gathers' backward.

Where it runs: CUDA devices of compute capability 9.x (Hopper: TMA and wgmma), or CPU tensors under the Triton
interpreter (tests); fp16/bf16; head dims 64 and 128; GQA. ``backend="auto"`` does not pick it until a GPU run has
measured it (the committed auto table, :mod:`moga.backends.auto_table`).

Deterministic mode: the kernels use no atomics; the gathers' gradient scatter is an atomic ``index_add`` on CUDA
only where a token occurs at more than one position (top_k > 1, context frames), so such layouts are refused in
deterministic mode (``auto`` moves on to the next backend).
"""

from __future__ import annotations

import importlib.util

import torch

from moga._determinism import deterministic_enabled
from moga.backends._inputs import check_segment_inputs
from moga.backends.triton_backend import _interpreting
from moga.layout import SegmentLayout

# The kernels' tables (moga.kernels.contiguous_attention.configs), copied so that asking does not import triton.
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
REASONS_USE_LAYOUT = True


def _has_tensor_descriptors() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.language as tl

    return hasattr(tl, "make_tensor_descriptor")


def is_available() -> bool:
    """Triton with tensor descriptors, and a Hopper GPU or the Triton interpreter."""
    if not _has_tensor_descriptors():
        return False
    if _interpreting():
        return True
    return torch.cuda.is_available() and any(
        torch.cuda.get_device_capability(i)[0] == 9 for i in range(torch.cuda.device_count())
    )


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None = None
) -> str | None:
    """Why these flattened (T, H, D) inputs (and this layout, if given) cannot run here, from host metadata only;
    None if they can."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device != q.device:
            return f"{name} on {t.device}, q on {q.device}: all on one device"
        if t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; the TMA kernels take float16 and bfloat16"
    if q.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(q.device)
        if major != 9:
            return f"compute capability {major}.{minor}: the TMA kernels need Hopper (9.x)"
    elif not (q.device.type == "cpu" and _interpreting()):
        return f"q on {q.device} (needs a Hopper GPU, or cpu with TRITON_INTERPRET=1)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (supported: {HEAD_DIMS})"
    if layout is not None:
        if max(layout.q_index.numel(), layout.k_index.numel()) >= 2**31:
            return "2^31 or more positions (TMA coordinates are 32-bit)"
        if deterministic_enabled() and not (layout.q_unique and layout.k_unique):
            return "deterministic mode with repeated tokens: the gathers' gradient scatter uses atomics"
    return None


class _ContiguousAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, vs, q_offsets, k_offsets, scale: float):  # type: ignore[override]
        from moga.kernels.contiguous_attention import contiguous_attention_fwd

        out, lse = contiguous_attention_fwd(qs, ks, vs, q_offsets, k_offsets, scale)
        ctx.save_for_backward(qs, ks, vs, out, lse, q_offsets, k_offsets)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        from moga.kernels.contiguous_attention import contiguous_attention_bwd

        qs, ks, vs, out, lse, q_offsets, k_offsets = ctx.saved_tensors
        dq, dk, dv = contiguous_attention_bwd(dout.contiguous(), qs, ks, vs, out, lse, q_offsets, k_offsets, ctx.scale)
        return dq, dk, dv, None, None, None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    layout = check_segment_inputs("triton_tma", q, k, v, layout, unsupported_reason(q, k, v, layout))
    # One gather per tensor into segment order (contiguous, 16-byte aligned: fresh allocations).
    qs = q.index_select(0, layout.q_index)
    ks = k.index_select(0, layout.k_index)
    vs = v.index_select(0, layout.k_index)
    return _ContiguousAttention.apply(qs, ks, vs, layout.q_offsets, layout.k_offsets, softmax_scale)
