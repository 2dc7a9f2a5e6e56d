"""Triton backend: the fused segment-attention kernels of :mod:`moga.kernels.segment_attention`.

Runs CUDA tensors on the GPU (on the inputs' device, whichever is current), or CPU tensors through the Triton
interpreter (TRITON_INTERPRET=1, for tests). Head dims: any D from 1 to 256 (zero-padded to the next of 32, 64,
128, 256 once per call by the autograd wrapper; softmax scale from the real D). Dtypes: float16, bfloat16, float32.
Neither the forward nor the backward synchronises with the host, and neither uses floating-point atomics:
results are bitwise reproducible (deterministic mode needs nothing extra).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from moga.backends._autograd import segment_attention_autograd
from moga.backends._inputs import check_segment_inputs
from moga.layout import SegmentLayout

# The kernels' own limits (moga.kernels.segment_attention.configs), copied so that asking whether this backend can
# run something does not import triton (a test checks the two agree).
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    """Triton is importable and there is a GPU, or the Triton interpreter is on."""
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or _interpreting()


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these flattened (T, H, D) inputs cannot run here, from host metadata only; None if they can."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        device = t.device.type
        if device != "cuda" and not (device == "cpu" and _interpreting()):
            return f"{name} on {t.device} (needs cuda, or cpu with TRITON_INTERPRET=1)"
        if t.device != q.device:
            return f"{name} on {t.device}, q on {q.device}: all on one device"
    D = q.shape[-1]
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return f"head dim {D} (supported: any head dim from {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} (supported: float16, bfloat16, float32)"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    from moga.kernels.segment_attention import segment_attention_bwd, segment_attention_fwd
    from moga.kernels.segment_attention.configs import padded_head_dim

    layout = check_segment_inputs("triton", q, k, v, layout, unsupported_reason(q, k, v))
    # q, k, v padded to the tile width once per call (not again in backward), out and the gradients sliced once.
    return segment_attention_autograd(
        q, k, v, layout, softmax_scale, segment_attention_fwd, segment_attention_bwd, padded_head_dim(q.shape[-1])
    )
