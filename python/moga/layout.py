"""Segment layouts: which tokens attend to which, as contiguous segments.

Every MoGA branch reduces to one primitive, *segment attention*: tokens are arranged (through index
tensors, without copying q/k/v) into S contiguous segments, and the queries of segment s attend to all
keys of segment s and to nothing else. A routed group, a spatio-temporal window and a frame are each a
segment. Queries and keys have separate indices and offsets so that a segment's keys can differ from
its queries (the static branch adds context frames to the keys only).

Flattened token rows: q, k, v of shape (B, N, H, D) are viewed as (T, H, D) with T = B * N, token
(b, i) at row b * N + i.

Everything here runs on the tensors' device without host synchronisation; the number of segments S is a
host-known bound (empty segments are allowed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moga import _ops


@dataclass(frozen=True)
class SegmentLayout:
    """Tokens arranged into S attention segments.

    Attributes:
        q_index: (Lq,) int64. ``q_index[p]`` is the token row read as the query at position p.
        q_offsets: (S + 1,) int64, non-decreasing, ``q_offsets[0] == 0``. Segment s holds query positions
            ``q_offsets[s]:q_offsets[s + 1]``. Positions ``>= q_offsets[S]`` belong to no segment; their
            outputs are zero and they receive no gradient.
        k_index: (Lk,) int64. ``k_index[p]`` is the token row read as key/value at position p.
        k_offsets: (S + 1,) int64. Segment s holds key positions ``k_offsets[s]:k_offsets[s + 1]``.
        num_tokens: T, the number of token rows of q, k and v.
        q_unique: each token row occurs at most once in ``q_index[:q_offsets[S]]`` (true for top-1
            routing), so kernels may scatter query gradients without accumulation.
        k_unique: the same for ``k_index``.
        max_q_len: optional host-known upper bound of the longest query segment (``max(diff(q_offsets))``),
            when the builder knows one without reading device memory (window layouts do). Kernels that size a
            launch by the longest segment (the varlen backend) use it instead of Lq. None: unknown.
        max_k_len: the same for key segments.
    """

    q_index: torch.Tensor
    q_offsets: torch.Tensor
    k_index: torch.Tensor
    k_offsets: torch.Tensor
    num_tokens: int
    q_unique: bool = True
    k_unique: bool = True
    max_q_len: int | None = None
    max_k_len: int | None = None

    @property
    def num_segments(self) -> int:
        return self.q_offsets.numel() - 1

    @property
    def same_qk(self) -> bool:
        """True when every segment's keys are exactly its queries (self-attention inside groups)."""
        return self.k_index is self.q_index and self.k_offsets is self.q_offsets


def sort_by_segment(keys: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable sort of entries by segment key.

    Args:
        keys: (L,) int64, the segment of each entry in ``[0, num_segments)``; a negative key excludes the
            entry (it is placed after all segments).
        num_segments: S.

    Returns:
        order: (L,) int64, a stable permutation: ``keys[order]`` is non-decreasing with excluded entries last,
            and entries with equal keys keep their original order.
        offsets: (S + 1,) int64 segment boundaries in ``order``.
    """
    if keys.dtype == torch.int64 and keys.dim() == 1 and _ops.ops_available(keys.device.type, "sort_by_segment"):
        return torch.ops.moga.sort_by_segment(keys, num_segments)  # O(L) counting sort, same result
    sort_key = torch.where(keys < 0, torch.full_like(keys, num_segments), keys)
    order = torch.sort(sort_key, stable=True).indices
    counts = torch.zeros(num_segments + 1, dtype=torch.int64, device=keys.device)
    counts.scatter_add_(0, sort_key, torch.ones_like(sort_key))
    offsets = torch.zeros(num_segments + 1, dtype=torch.int64, device=keys.device)
    torch.cumsum(counts[:num_segments], 0, out=offsets[1:])
    return order, offsets


def segment_of_positions(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(length,) int64 segment of each position of a layout's index list (``offsets`` (S + 1,) its segment
    boundaries); -1 past the last segment."""
    pos = torch.arange(length, device=offsets.device, dtype=torch.int64)
    seg = torch.searchsorted(offsets, pos, right=True) - 1
    return torch.where(pos < offsets[-1], seg, torch.full_like(seg, -1))


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """(L,) -> (L,): ``inv[order[p]] = p``."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inv


@dataclass(frozen=True)
class RoutedLayout:
    """A self-attention segment layout plus the map back to tokens.

    Entry e = t * top_k + j is token t's j-th group. ``position[e]`` is the segment position (row of the
    segment output) holding entry e; entries of padding tokens sit past the last segment, whose output
    rows are zero.
    """

    segments: SegmentLayout
    position: torch.Tensor  # (T * top_k,) int64
    top_k: int


def resegment(
    layout: RoutedLayout,
    q_keys: torch.Tensor,
    k_keys: torch.Tensor,
    num_segments: int,
    *,
    k_index: torch.Tensor | None = None,
    k_unique: bool | None = None,
) -> RoutedLayout:
    """``layout`` with its query and key entries re-sorted into new segments, each new segment a part of an old one
    (so ``num_tokens``, ``q_unique`` and the length bounds carry over). No host synchronisation.

    Args:
        layout: the layout to split or filter.
        q_keys: (Lq,) int64, the new segment of each query entry of ``layout.segments``, in [0, num_segments);
            negative: excluded (sorted past the last segment: output 0).
        k_keys: (Lk',) int64, the new segment of each key entry of ``k_index``; negative: excluded.
        num_segments: S', the number of new segments.
        k_index: (Lk',) int64 token rows of the key entries (default: ``layout.segments.k_index``).
        k_unique: whether a token is a key of at most one new segment (default: ``layout.segments.k_unique``).

    Returns: the new layout, ``position`` updated so its entries keep their meaning.
    """
    seg = layout.segments
    q_order, q_offsets = sort_by_segment(q_keys, num_segments)
    k_order, k_offsets = sort_by_segment(k_keys, num_segments)
    k_rows = seg.k_index if k_index is None else k_index
    segments = SegmentLayout(
        q_index=seg.q_index[q_order], q_offsets=q_offsets, k_index=k_rows[k_order], k_offsets=k_offsets,
        num_tokens=seg.num_tokens, q_unique=seg.q_unique, k_unique=seg.k_unique if k_unique is None else k_unique,
        max_q_len=seg.max_q_len, max_k_len=seg.max_k_len,
    )  # fmt: skip
    return RoutedLayout(segments=segments, position=inverse_permutation(q_order)[layout.position], top_k=layout.top_k)


def row_group_keys(groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """The segment of every entry when segments are (batch row, group) pairs: groups (B, ...) int64 in
    ``[0, num_groups)`` or negative -> (groups.numel(),) int64 keys ``b * num_groups + g``, -1 for negative g (the
    input of :func:`sort_by_segment` with ``B * num_groups`` segments)."""
    shape = (groups.shape[0],) + (1,) * (groups.dim() - 1)
    batch = torch.arange(groups.shape[0], device=groups.device, dtype=torch.int64).view(shape)
    return torch.where(groups < 0, torch.full_like(groups, -1), groups + batch * num_groups).reshape(-1)


def routed_layout(groups: torch.Tensor, num_groups: int) -> RoutedLayout:
    """Build the layout for tokens assigned to groups.

    Args:
        groups: (B, N, K) int64 group of each token's K slots in ``[0, num_groups)``, or negative for
            padding (the token is neither query nor key in that slot).
        num_groups: M, the number of groups per batch row; segments are (batch row, group) pairs, S = B * M.

    Returns: a :class:`RoutedLayout` whose segments hold each (row, group)'s entries in token order, as queries
    and as keys (``q_unique``/``k_unique`` iff K == 1), and ``position`` (B * N * K,) int64.
    """
    B, N, K = groups.shape
    order, offsets = sort_by_segment(row_group_keys(groups, num_groups), B * num_groups)
    token_of_position = torch.div(order, K, rounding_mode="floor")
    unique = K == 1
    seg = SegmentLayout(
        q_index=token_of_position,
        q_offsets=offsets,
        k_index=token_of_position,
        k_offsets=offsets,
        num_tokens=B * N,
        q_unique=unique,
        k_unique=unique,
    )
    return RoutedLayout(segments=seg, position=inverse_permutation(order), top_k=K)
