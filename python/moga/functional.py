"""Public functional API: group attention and MoGA (routed, gated group attention)."""

from __future__ import annotations

import torch

from moga._checks import (
    check_group_ids,
    check_num_groups,
    check_qkv,
    check_router_logits,
    check_top_k,
    softmax_scale_or_default,
)
from moga._determinism import deterministic_mode
from moga.backends import select_backend
from moga.gate import gated_unpermute
from moga.layout import RoutedLayout, routed_layout
from moga.router import route_tokens


def _compact_per_row(ids: torch.Tensor) -> torch.Tensor:
    """(B, N) int64 ids, negative for padding -> ids in [0, N) that partition each row the same way.

    A row holds at most N distinct ids, so its groups can be renumbered by rank among the row's distinct
    values: one sort per row on the device (O(N log N) time, O(N) memory, no host synchronisation). Padding
    may take rank 0 (it sorts first); real ids then start at 1, still below N. Group attention depends only
    on the partition, not on the id values, and stable sorting keeps every group's tokens in token order.
    """
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    rank = torch.cumsum(starts, dim=1) - 1  # (B, N) int64, in [0, N)
    dense = torch.empty_like(ids).scatter_(1, order, rank)
    return torch.where(ids < 0, torch.full_like(ids, -1), dense)


def _dense_group_ids(group_ids: torch.Tensor, num_groups: int | None) -> tuple[torch.Tensor, int]:
    """Map arbitrary non-negative ids to [0, G); negative ids become -1.

    Returns (ids (B, N) int64, G), with G <= max(N, 1) so that the layout (B * G segments) is O(B * N)
    whatever the labels: G is num_groups when given and at most N, otherwise the number of distinct ids
    (plus one, an empty group, when there is padding) when that is at most N; past N the ids of each row are
    renumbered by :func:`_compact_per_row` and G = N. Neither path adds a host synchronisation.
    """
    ids = group_ids.long()
    check_num_groups(num_groups)
    B, N = ids.shape
    bound = max(N, 1)  # host-known: a row of N tokens has at most N non-empty groups
    if num_groups is not None:
        if num_groups <= torch.iinfo(torch.int64).max:  # past it every int64 id is in range
            in_range = (ids < num_groups).all()
            if ids.device.type == "cpu" and not torch.compiler.is_compiling():
                if not bool(in_range):
                    raise ValueError(f"group_ids must be < num_groups={num_groups}, got max {int(ids.max())}")
            else:  # checked on the device without a host synchronisation (and traceable: an op in the graph)
                torch._assert_async(in_range, "moga: group_ids must be < num_groups")
        if num_groups > bound:
            return _compact_per_row(ids), bound
        return torch.where(ids < 0, torch.full_like(ids, -1), ids), num_groups
    # Arbitrary ids: compact them. torch.unique reads its output size back to the host (one sync);
    # pass num_groups to avoid it.
    valid = ids >= 0
    uniq, inverse = torch.unique(torch.where(valid, ids, torch.full_like(ids, -1)), return_inverse=True)
    if uniq.numel() > bound:  # distinct over the whole batch (up to B * N + 1): renumber per row instead
        return _compact_per_row(ids), bound
    # Padding, when present, is uniq[0] = -1: shift the real ids down on the device instead of reading uniq[0]
    # back (a second sync). G then also counts -1, which leaves one empty segment per batch row.
    dense = inverse - (uniq[:1] < 0).sum()
    return torch.where(valid, dense, torch.full_like(dense, -1)), max(uniq.numel(), 1)


def _segment_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: RoutedLayout,
    scale: float,
    backend: str,
    deterministic: bool = False,
) -> torch.Tensor:
    """Segment attention over flattened tokens; returns the segment-order outputs (T * top_k, Hq, D).

    ``deterministic`` (or torch's global deterministic flag) is visible to the backend through
    :func:`moga._determinism.deterministic_enabled` in its forward and in its backward.
    """
    B, N, Hq, D = q.shape
    qf, kf, vf = q.reshape(B * N, Hq, D), k.reshape(B * N, k.shape[2], D), v.reshape(B * N, v.shape[2], D)
    with deterministic_mode(deterministic):  # selection sees the mode too: "auto" skips backends that refuse it
        impl = select_backend(backend, qf, kf, vf, routed.segments)
        out_seg = impl.segment_attention(qf, kf, vf, routed.segments, scale)
    if not out_seg.requires_grad and torch.is_grad_enabled():
        # With nothing to attend (N = 0, B = 0, all padding) a backend may return zeros built without reading
        # q/k/v; tie them to the graph (adding an exact 0) so backward yields zero gradients instead of failing.
        for t in (qf, kf, vf):
            if t.requires_grad:
                out_seg = out_seg + t[:0].sum()
    return out_seg


def _run_segments(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routed: RoutedLayout,
    scale: float,
    backend: str,
    deterministic: bool = False,
) -> torch.Tensor:
    """Segment attention over flattened tokens; returns per-entry outputs (T, top_k, Hq, D) in token order."""
    B, N, Hq, D = q.shape
    out_seg = _segment_outputs(q, k, v, routed, scale, backend, deterministic)
    return out_seg[routed.position].view(B * N, routed.top_k, Hq, D)


def group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    num_groups: int | None = None,
    backend: str = "auto",
    deterministic: bool = False,
) -> torch.Tensor:
    """Attention inside groups of tokens.

    Query token i of batch row b attends to exactly the keys j of row b with
    ``group_ids[b, j] == group_ids[b, i]``. Ids need not be dense or sorted; a negative id marks padding:
    that query's output is 0 and that key is never attended.

    Args:
        q: (B, N, Hq, D). k, v: (B, N, Hkv, D), Hq a multiple of Hkv (query head h uses kv head
            h // (Hq // Hkv)).
        group_ids: (B, N) integer, shared by all heads.
        softmax_scale: defaults to D ** -0.5.
        num_groups: if given, ids must lie in [-inf, num_groups) and the call never synchronises with the
            GPU; if None, ids are compacted with ``torch.unique`` (one host synchronisation). Memory and
            time are O(B * N) whatever num_groups is: past N, ids are renumbered per row on the device.
        backend: "auto", "triton", "cuda", "cpu" or "torch" (see :func:`moga.available_backends`).
        deterministic: bitwise reproducible forward and backward (kernels avoid floating-point atomics);
            also on when ``torch.are_deterministic_algorithms_enabled()``.

    Returns: (B, N, Hq, D), dtype of q. Differentiable in q, k and v.
    """
    B, N, _, _, D = check_qkv(q, k, v)
    check_group_ids(group_ids, B, N, q.device)
    scale = softmax_scale_or_default(softmax_scale, D)
    dense, G = _dense_group_ids(group_ids, num_groups)
    routed = routed_layout(dense.view(B, N, 1), G)
    return _run_segments(q, k, v, routed, scale, backend, deterministic)[:, 0].view(q.shape)


def _check_valid(valid: torch.Tensor, B: int, N: int, device: torch.device) -> None:
    """A validity mask must be a (B, N) bool tensor on the device of q."""
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor (False = padding), got {getattr(valid, 'dtype', type(valid))}")
    if tuple(valid.shape) != (B, N):
        raise ValueError(f"valid must have shape (batch, seqlen) = {(B, N)}, got {tuple(valid.shape)}")
    if valid.device != device:
        raise ValueError(f"valid is on {valid.device} but q is on {device}")


def moga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    top_k: int = 1,
    softmax_scale: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mixture-of-Groups attention (paper Eq. 5, generalised to top_k groups per token).

    p = softmax(router_logits). Each token belongs, as query and as key, to its ``top_k`` most probable
    groups (ties go to the lower group index), and
    ``out[b, i] = sum over groups m of token i of p[b, i, m] * Attn_m(q_i)``, Attn_m being attention over
    the keys of row b in group m. With ``top_k=1`` this is MoGA(x) = p(g(x)|x) * Attention within g(x);
    with M = 1 it is dense attention.

    Args:
        q: (B, N, Hq, D). k, v: (B, N, Hkv, D).
        router_logits: (B, N, M) float, one routing per token shared by all heads.
        top_k: groups per token, in [1, M].
        softmax_scale: defaults to D ** -0.5.
        backend: see :func:`group_attention`.
        deterministic: see :func:`group_attention`.
        valid: (B, N) bool or None. False marks padding, as a negative id does in :func:`group_attention`:
            the token is neither a query nor a key of any group, its output is 0 and its router logits get no
            gradient. None: every token is valid.

    Returns: (B, N, Hq, D), dtype of q. Differentiable in q, k, v and router_logits (through the gate p).
    Never synchronises with the GPU.
    """
    B, N, _, _, D = check_qkv(q, k, v)
    M = check_router_logits(router_logits, B, N, q.device)
    check_top_k(top_k, M)
    scale = softmax_scale_or_default(softmax_scale, D)
    _, groups, gates = route_tokens(router_logits, top_k)
    if valid is not None:
        _check_valid(valid, B, N, q.device)
        groups = torch.where(valid[..., None], groups, torch.full_like(groups, -1))  # padding: in no group
    routed = routed_layout(groups, M)
    out_seg = _segment_outputs(q, k, v, routed, scale, backend, deterministic)  # (T * K, Hq, D)
    return gated_unpermute(out_seg, routed.position, gates.reshape(B * N, top_k)).view(q.shape)
