"""Varlen backend: the paper's kernel-free recipe on PyTorch's own varlen kernel.

Gathers q, k and v into segment order (one ``index_select`` per tensor, int64 indices), calls
``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA only; it dispatches to cuDNN on sm_90/sm_100 with
cuDNN >= 9.18 for 16-bit inputs with equal q/k head counts, D % 8 == 0 and max_q > 128, else to FlashAttention-2)
with cu_seqlens built from the layout's offsets, and returns the output in segment order (the caller
un-permutes, e.g. the fused gated un-permute of :func:`moga.moga_attention`). Gradients flow through varlen_attn's
own backward and through the gathers (whose backward scatters into token rows).

Shapes: q (T, Hq, D), k/v (T, Hkv, D) -> out (Lq, Hq, D) with Lq = layout.q_index.numel(). Positions past the last
segment ("tail" positions, e.g. routing entries of padding tokens) get zero rows and no gradient; so do the queries
of a segment without keys.

No host synchronisation. varlen_attn needs host integers ``max_q``/``max_k`` (the longest query/key segment);
the exact values would need a device-to-host copy, so the backend passes host-known bounds: the layout's
``max_q_len``/``max_k_len`` where its builder knows them (window layouts: the window volume, plus the context
frames for keys), else Lq and Lk, the total number of query/key positions. A bound larger than the real maximum
is correct (FlashAttention sizes its grid as ceil(max_q / 128) x (segments + 1) x heads, and programs past a
segment's end exit at once; FlashAttention-2's buffers are sized by the totals, not the bound) but costs empty
programs: with the total as
bound about (S + 1) * Lq / 128 * Hq of them, negligible for a few long segments (routed groups, S = B * M) and
prohibitive for thousands of short ones, which is why window layouts carry their bound. Callers that know a
tighter bound pass it with :func:`seqlen_bounds`. Every bound other than the totals is checked on the device
(``torch._assert_async``), never read back. A bound that does not change between steps also keeps cuDNN's graph
cache (keyed on max_q/max_k) warm.

Heads: where the installed varlen_attn has ``enable_gqa`` (torch >= 2.12) GQA runs natively; otherwise the gather
expands each kv head to its Hq / Hkv query heads (one gather of an expanded view, no extra pass). Head dims up
to 256; a head dim that is not a multiple of 8 is zero-padded (scores unchanged, the padded output columns are
dropped; the softmax scale is that of the real D). Where varlen_attn has no ``scale`` argument (torch 2.10) the
scale is folded into q.

Memory: the gathered copies of q, k and v (3 x L x H x D elements beyond the inputs, L ~ T * top_k; with
expanded GQA heads k and v count Hq heads) live until backward; the output and its log-sum-exp as usual.

Deterministic mode (``deterministic=True`` or ``torch.use_deterministic_algorithms(True)``): refused, and
``backend="auto"`` skips this backend. FlashAttention-2's backward accumulates dq with floating-point atomics
unless torch's global flag is set, torch itself treats cuDNN attention as non-deterministic, and with repeated tokens
(top_k > 1, context frames) the gathers' gradient scatter is an atomic index_add on CUDA.

Testing without a GPU: :data:`varlen_attn_override` replaces varlen_attn by any callable with its signature
(tests pass a per-segment float64 SDPA stand-in); while it is set, CPU tensors are accepted too.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator

import torch

from moga._determinism import deterministic_enabled
from moga._head_dim import pad_head_dim
from moga.backends._inputs import check_segment_inputs
from moga.layout import SegmentLayout, segment_of_positions

# Injection point: a callable with varlen_attn's signature
# ``(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=..., enable_gqa=...)`` used instead of torch's
# varlen_attn when not None (tests substitute a CPU stand-in). ``scale`` and ``enable_gqa`` are optional: they are
# passed only when the callable's signature has them, as with torch's own versions.
varlen_attn_override: Callable[..., torch.Tensor] | None = None

DTYPES = (torch.float16, torch.bfloat16)  # what FlashAttention-2 and cuDNN take
MAX_HEAD_DIM = 256
INT32_MAX = 2**31 - 1  # cu_seqlens are int32
# FlashAttention-2 puts the sequence index on gridDim.y (and the head on gridDim.z): at most 65535 each.
MAX_SEQUENCES = 65535

_bounds = threading.local()


def _torch_varlen_attn() -> Callable[..., torch.Tensor] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _impl() -> Callable[..., torch.Tensor] | None:
    return varlen_attn_override if varlen_attn_override is not None else _TORCH_VARLEN


def _parameters(fn: Callable[..., torch.Tensor] | None) -> frozenset[str]:
    if fn is None:
        return frozenset()
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


# torch's own varlen_attn and its parameter names, read once at import (inspect stays out of traced code).
_TORCH_VARLEN = _torch_varlen_attn()
_TORCH_KEYWORDS = _parameters(_TORCH_VARLEN)


def _keywords(fn: Callable[..., torch.Tensor]) -> frozenset[str]:
    """Names of the parameters of ``fn`` (to pass ``scale``/``enable_gqa`` only where they exist)."""
    if fn is _TORCH_VARLEN:
        return _TORCH_KEYWORDS
    return _parameters(fn)  # a stand-in (tests)


def is_available() -> bool:
    """torch has ``varlen_attn`` and CUDA is available (or a stand-in is installed in :data:`varlen_attn_override`)."""
    if varlen_attn_override is not None:
        return True
    return _TORCH_VARLEN is not None and torch.cuda.is_available()


# select_backend passes the layout to unsupported_reason (size limits that depend on it).
REASONS_USE_LAYOUT = True


def unsupported_reason(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None = None
) -> str | None:
    """Why these flattened (T, H, D) inputs (and this layout, if given) cannot run here, from host metadata only;
    None if they can."""
    if _impl() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch >= 2.10)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cuda" and varlen_attn_override is None:
            return f"varlen_attn is CUDA-only; {name} is on {t.device}"
        if t.device != q.device:
            return f"{name} on {t.device}, q on {q.device}: all on one device"
        if t.dtype not in DTYPES:
            return f"{name} has dtype {t.dtype}; varlen_attn takes float16 and bfloat16"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.dim() == 3 and q.shape[1] > MAX_SEQUENCES:
        return f"{q.shape[1]} query heads exceed FlashAttention's grid limit of {MAX_SEQUENCES}"
    if deterministic_enabled():
        return (
            "deterministic mode: varlen_attn's backward accumulates with floating-point atomics (FlashAttention-2 "
            "dq unless torch.use_deterministic_algorithms(True); cuDNN always) and so does the gathers' gradient "
            "scatter for repeated tokens; use backend='triton'"
        )
    return None if layout is None else _layout_reason(layout)


def _layout_reason(layout: SegmentLayout) -> str | None:
    """Size limits of varlen_attn that depend on the layout (host-known sizes only)."""
    Lq, Lk = layout.q_index.numel(), layout.k_index.numel()
    # cu_seqlens are int32, and FlashAttention-2's backward sizes its dq accumulator as total + 128 * sequences
    # in int: both must stay below 2^31.
    padded = 128 * (layout.num_segments + 1)
    if max(Lq, Lk) + padded > INT32_MAX:
        return (
            f"{Lq} query / {Lk} key positions (+{padded} of FlashAttention's per-sequence padding) exceed "
            f"varlen_attn's int32 sizes (at most {INT32_MAX})"
        )
    if layout.num_segments + 1 > MAX_SEQUENCES:
        return (
            f"{layout.num_segments} segments (+1 for the tail) exceed FlashAttention's grid limit of "
            f"{MAX_SEQUENCES} sequences per call"
        )
    return None


@contextlib.contextmanager
def seqlen_bounds(max_q: int | None = None, max_k: int | None = None) -> Iterator[None]:
    """Within this context (on this thread) the varlen backend passes ``max_q``/``max_k`` to varlen_attn instead
    of the layout's ``max_q_len``/``max_k_len`` or, where it has none, the total number of query/key positions.

    Give bounds the caller knows on the host, e.g. a routing capacity (tokens per group). The tail sequence
    (positions past the last segment, e.g. padding tokens' routing entries) must fit the bounds too.
    Each must be >= the longest query (key) segment; that is checked on the device without a synchronisation
    (a violated bound fails the next CUDA call with a device-side assertion). None keeps the default.
    """
    for name, value in (("max_q", max_q), ("max_k", max_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"seqlen_bounds: {name} must be a positive int or None, got {value!r}")
    previous = getattr(_bounds, "value", (None, None))
    _bounds.value = (max_q, max_k)
    try:
        yield
    finally:
        _bounds.value = previous


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout) -> SegmentLayout:
    layout = check_segment_inputs("varlen", q, k, v, layout, unsupported_reason(q, k, v))
    reason = _layout_reason(layout)
    if reason is not None:
        raise ValueError(f"varlen backend cannot run this layout: {reason}; use backend='triton'")
    return layout


def _cu_seqlens(offsets: torch.Tensor, total: int) -> torch.Tensor:
    """(S + 1,) int64 offsets -> (S + 2,) int32: the segments, then one "tail" sequence up to ``total``.

    The tail sequence puts every row of the gathered tensors inside some sequence, so the kernel writes every
    output row and every gradient row (FlashAttention leaves rows past cu_seqlens[-1] unwritten); its outputs are
    masked to zero and so receive zero gradients.
    """
    end = torch.full((1,), total, dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end]).to(torch.int32)


def _bound(default: int, override: int | None, offsets: torch.Tensor, name: str) -> int:
    """The max_q/max_k to pass: the caller's bound (checked on the device) or the host-known default.

    Never below 2: FlashAttention-2 treats max_seqlen_q == 1 with GQA as decoding and reshapes q on the assumption
    of one query per sequence, which the tail and empty sequences here break. A larger bound is always valid.
    """
    if override is None:
        return max(default, 2)
    if offsets.numel() > 1:
        longest = torch.diff(offsets).max()
        torch._assert_async(longest <= override, f"moga varlen backend: a segment is longer than {name}={override}")
    return max(override, 2)


def _gather(x: torch.Tensor, index: torch.Tensor, heads: int) -> torch.Tensor:
    """x (T, H, D) -> (L, heads, D) rows ``x[index]``, each kv head repeated heads // H times (GQA expansion)."""
    T, H, D = x.shape
    if heads == H:
        return x.index_select(0, index)
    g = heads // H
    return x.unsqueeze(2).expand(T, H, g, D).index_select(0, index).reshape(index.numel(), heads, D)


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    layout = _check_inputs(q, k, v, layout)
    fn = _impl()
    assert fn is not None  # _check_inputs refused otherwise
    keywords = _keywords(fn)
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    Lq, Lk = layout.q_index.numel(), layout.k_index.numel()
    if Lq == 0 or Lk == 0:  # nothing to attend: every row is zero (host-known sizes)
        return q.new_zeros(Lq, Hq, D)

    native_gqa = "enable_gqa" in keywords and Hq != Hkv
    # Index tensors are contiguous already (check_segment_inputs).
    qs = _gather(q, layout.q_index, Hq)
    ks = _gather(k, layout.k_index, Hkv if native_gqa else Hq)
    vs = _gather(v, layout.k_index, Hkv if native_gqa else Hq)
    Dk = -(-D // 8) * 8  # FlashAttention and cuDNN take head dims that are multiples of 8
    qs, ks, vs = (pad_head_dim(t, Dk) for t in (qs, ks, vs))

    kwargs = {}
    if "scale" in keywords:
        kwargs["scale"] = softmax_scale
    else:  # torch 2.10: the kernel's scale is Dk ** -0.5; fold the ratio into q
        factor = softmax_scale * math.sqrt(Dk)
        if factor != 1.0:
            qs = qs * factor
    if native_gqa:
        kwargs["enable_gqa"] = True

    override_q, override_k = getattr(_bounds, "value", (None, None))
    if override_q is None:
        override_q = layout.max_q_len
    if override_k is None:
        override_k = layout.max_k_len
    max_q = _bound(Lq, override_q, layout.q_offsets, "max_q")
    max_k = _bound(Lk, override_k, layout.k_offsets, "max_k")
    cu_q = _cu_seqlens(layout.q_offsets, Lq)
    cu_k = _cu_seqlens(layout.k_offsets, Lk)
    if override_q is not None or override_k is not None:
        # The tail sequence must fit the bounds too: give it no rows beyond the caller's bound.
        tail_q = Lq - layout.q_offsets[-1]
        tail_k = Lk - layout.k_offsets[-1]
        torch._assert_async((tail_q <= max_q) & (tail_k <= max_k), "moga varlen backend: tail exceeds seqlen bounds")

    out = fn(qs, ks, vs, cu_q, cu_k, max_q, max_k, **kwargs)  # (Lq, Hq, Dk)
    if Dk != D:
        out = out[..., :D]
    # Zero the rows of the tail sequence and of segments without keys (sequence s has keys iff cu_k[s+1] > cu_k[s];
    # the tail, segment -1, reads the trailing False).
    has_keys = torch.diff(layout.k_offsets) > 0  # (S,)
    has_keys = torch.cat([has_keys, has_keys.new_zeros(1)])  # (S + 1,)
    seq = segment_of_positions(layout.q_offsets, Lq)  # (Lq,) in [0, S) or -1
    keep = has_keys[seq]
    return torch.where(keep[:, None, None], out, out.new_zeros(()))


__all__ = ["is_available", "segment_attention", "seqlen_bounds", "unsupported_reason", "varlen_attn_override"]
