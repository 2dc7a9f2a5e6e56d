"""The gated un-permute of MoGA: out[t] = sum_j gate[t, j] * out_seg[position[t * K + j]].

One autograd function instead of a gather followed by a broadcast multiply: the products are taken in
float32 (float64 for float64 inputs) over bounded chunks of tokens, so no float32 copy of the whole
(T, K, H, D) output is ever allocated (at 580K tokens x 40 heads x 128 that copy alone would be 12 GB), and
the backward saves nothing new (``out_seg`` is the tensor the attention backward keeps anyway).

Autocast is switched off inside: ``einsum`` is on autocast's lower-precision list, and under a bf16 autocast region it
would round the gates and the products to bf16 (a relative error of about 3e-3 even for float32 inputs). These
products are a per-row scaling, not a matmul worth running in low precision.

Backward: d out_seg[position[t * K + j]] = gate[t, j] * dout[t] (``position`` is a permutation, so every row
has one writer) and d gate[t, j] = sum over (h, d) of dout[t] * out_seg[position[t * K + j]], the gate's
gradient the router learns through.

Two implementations with the same contract: the compiled ops ``moga::gated_unpermute`` / ``gated_unpermute_bwd``
(``csrc/cpu/gated_unpermute.cpp``, ``csrc/cuda/gated_unpermute.cu``: one fused pass over the rows, no temporary at
all), used wherever the extension has them for the tensors' device, and the chunked torch composition below
(identical accumulation dtype; the sum over K may associate differently), used otherwise.
"""

from __future__ import annotations

import os

import torch

from moga import _ops

# float32 elements per chunk of the products (128 MB): bounds the temporaries independently of N.
_CHUNK_ELEMENTS = 1 << 25


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _token_chunks(T: int, row_elements: int) -> tuple[range, int]:
    """Chunk starts over T tokens and the chunk length, for rows of ``row_elements`` float32 each."""
    step = max(1, _CHUNK_ELEMENTS // max(row_elements, 1))
    return range(0, T, step), step


class _GatedUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_seg: torch.Tensor, position: torch.Tensor, gates: torch.Tensor):  # type: ignore[override]
        T, K = gates.shape
        H, D = out_seg.shape[1], out_seg.shape[2]
        out = out_seg.new_empty(T, H, D)
        acc = _compute_dtype(out_seg)
        starts, step = _token_chunks(T, K * H * D)
        with torch.autocast(out_seg.device.type, enabled=False):
            for a in starts:
                b = min(a + step, T)
                rows = out_seg.index_select(0, position[a * K : b * K]).view(b - a, K, H, D)
                out[a:b] = torch.einsum("tkhd,tk->thd", rows.to(acc), gates[a:b].to(acc)).to(out.dtype)
        ctx.save_for_backward(out_seg, position, gates)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        out_seg, position, gates = ctx.saved_tensors
        T, K = gates.shape
        H, D = out_seg.shape[1], out_seg.shape[2]
        d_seg = d_gates = None
        if ctx.needs_input_grad[0]:
            d_seg = out_seg.new_empty(out_seg.shape)
        if ctx.needs_input_grad[2]:
            d_gates = torch.empty_like(gates)
        acc = _compute_dtype(out_seg)
        starts, step = _token_chunks(T, K * H * D)
        with torch.autocast(out_seg.device.type, enabled=False):
            for a in starts:
                b = min(a + step, T)
                g = dout[a:b].to(acc)  # [t, H, D]
                pos = position[a * K : b * K]
                if d_seg is not None:
                    rows = torch.einsum("thd,tk->tkhd", g, gates[a:b].to(acc)).reshape(-1, H, D)
                    d_seg.index_copy_(0, pos, rows.to(d_seg.dtype))
                if d_gates is not None:
                    rows = out_seg.index_select(0, pos).view(b - a, K, H, D).to(acc)
                    d_gates[a:b] = torch.einsum("thd,tkhd->tk", g, rows).to(d_gates.dtype)
        return d_seg, None, d_gates


class _CompiledGatedUnpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out_seg: torch.Tensor, position: torch.Tensor, gates: torch.Tensor):  # type: ignore[override]
        _ops.sync_poison_outputs()
        ctx.save_for_backward(out_seg, position, gates)
        return torch.ops.moga.gated_unpermute(out_seg, position, gates)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):  # type: ignore[override]
        out_seg, position, gates = ctx.saved_tensors
        _ops.sync_poison_outputs()
        d_seg, d_gates = torch.ops.moga.gated_unpermute_bwd(dout.contiguous(), out_seg, position, gates)
        return (
            d_seg if ctx.needs_input_grad[0] else None,
            None,
            d_gates if ctx.needs_input_grad[2] else None,
        )


IMPLS = ("auto", "compiled", "torch")

# What impl="auto" means, from MOGA_GATE_IMPL at import ("auto" by default): "torch" keeps the compiled gate out of
# every call, e.g. to tell a fault of the gate kernel from one of the attention kernels.
_AUTO = os.environ.get("MOGA_GATE_IMPL", "auto").strip().lower() or "auto"
if _AUTO not in IMPLS:
    raise ValueError(f"MOGA_GATE_IMPL must be one of {IMPLS}, got {_AUTO!r}")


def gated_unpermute(
    out_seg: torch.Tensor, position: torch.Tensor, gates: torch.Tensor, impl: str = "auto"
) -> torch.Tensor:
    """out_seg (L, H, D) segment-order outputs, position (T * K,) int64 permutation of [0, L) with L = T * K,
    gates (T, K) float -> out (T, H, D) in out_seg's dtype, computed in float32 (float64 for float64 inputs).
    Differentiable in out_seg and gates.

    impl: ``"compiled"`` (the moga._C ops; ValueError where the extension lacks them for this device),
    ``"torch"`` (the chunked composition), ``"auto"`` (compiled where available, unless the environment variable
    ``MOGA_GATE_IMPL`` named another at import).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = _AUTO
    device = out_seg.device.type
    compiled = _ops.ops_available(device, "gated_unpermute") and _ops.ops_available(device, "gated_unpermute_bwd")
    if impl == "compiled" and not compiled:
        raise ValueError(f"the compiled gated_unpermute ops are not available for {device} tensors")
    if impl != "torch" and compiled:
        return _CompiledGatedUnpermute.apply(out_seg, position, gates)
    return _GatedUnpermute.apply(out_seg, position, gates)
