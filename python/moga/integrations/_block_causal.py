"""Block-causal MoGA: every branch restricted to keys of the same or earlier frame blocks (SkyReels-V2's
diffusion forcing, ``num_frame_per_block > 1``).

The latent frames are cut into blocks of ``frames_per_block`` frames; a query in block b may attend only to keys
in blocks 0..b (the stock model's dense mask). Under MoGA this mask is intersected with every branch: a routed
group, an STGA window, a frame. On the segment primitive a segment s becomes ``num_blocks`` segments (s, b): the
queries of s in block b, and the keys of s in blocks <= b. No dense mask; the key lists grow by at most a factor
``num_blocks`` (a key of block c is listed once for every b >= c).

The restricted STGA and frame layouts depend only on host values (grid, window, shots, context frames, device,
batch, frames per block) and are cached like :func:`moga.window.window_layout`
(:func:`block_causal_window_layout`). The routed branch's layout depends on the router's output and is built on
every call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from moga._checks import softmax_scale_or_default
from moga.integrations._core import Routing, _branch_mean, _routing_of
from moga.layout import RoutedLayout, resegment, segment_of_positions
from moga.modules import WindowArg
from moga.window import Grid, check_grid, normalize_shot_starts, window_layout


def restrict_block_causal(layout: RoutedLayout, block_of_row: torch.Tensor, num_blocks: int) -> RoutedLayout:
    """Split every segment of ``layout`` by the query's block, keeping keys of the same or earlier blocks.

    Args:
        layout: any self-attention layout (routed groups, windows), ``position`` mapping its entries.
        block_of_row: (T,) int64, the block of each token row, in [0, num_blocks).
        num_blocks: number of blocks.

    Returns: the restricted layout, S * num_blocks segments, ``position`` updated. No host synchronisation.
    """
    seg = layout.segments
    S, nb = seg.num_segments, num_blocks
    device = seg.q_index.device
    q_seg = segment_of_positions(seg.q_offsets, seg.q_index.numel())
    q_keys = torch.where(q_seg >= 0, q_seg * nb + block_of_row[seg.q_index], torch.full_like(q_seg, -1))
    k_seg = segment_of_positions(seg.k_offsets, seg.k_index.numel())
    blocks = torch.arange(nb, device=device, dtype=torch.int64).view(1, nb)
    usable = (k_seg >= 0).view(-1, 1) & (blocks >= block_of_row[seg.k_index].view(-1, 1))  # (Lk, nb)
    k_keys = torch.where(usable, k_seg.view(-1, 1) * nb + blocks, torch.full_like(usable, -1, dtype=torch.int64))
    k_rows = seg.k_index.view(-1, 1).expand(-1, nb).reshape(-1)
    return resegment(layout, q_keys, k_keys.reshape(-1), S * nb, k_index=k_rows, k_unique=seg.k_unique and nb == 1)


def block_of_rows(batch: int, grid: Grid, frames_per_block: int, device: torch.device) -> torch.Tensor:
    """(batch * T * H * W,) int64 causal block of every flattened token row (row b * N + i, i in raster order over
    ``grid``): frame // frames_per_block."""
    _, H, W = grid
    N = grid[0] * H * W
    rows = torch.arange(batch * N, device=device, dtype=torch.int64)
    return torch.div(rows % N, H * W * frames_per_block, rounding_mode="floor")


# Bounded like window_layout's cache, smaller: an entry holds about 16 + 8 * num_blocks bytes per token on the device
# (its key lists keep the excluded entries past the last segment), e.g. ~160 MB at N = 580K with 32 blocks. One
# video shape uses two entries (STGA and per-frame), so 4 keeps two shapes warm.
@functools.lru_cache(maxsize=4)
def block_causal_window_layout(
    grid: Grid,
    window: Grid,
    shot_starts: tuple[int, ...],
    context_frames: int,
    device: torch.device,
    batch: int,
    frames_per_block: int,
) -> RoutedLayout:
    """:func:`moga.window.window_layout` restricted to block-causal keys (:func:`restrict_block_causal`), built once
    per argument tuple (cached).

    Args: as :func:`moga.window.window_layout` (already validated, ``shot_starts`` normalised), and
        ``frames_per_block``, which divides the grid's T.

    Returns: the restricted :class:`RoutedLayout`, batch * (window layout's segments) * (T / frames_per_block)
    segments. Callers must not modify its tensors (they are shared by every call with the same arguments).
    """
    # Under torch.compile the layout is traced into the graph (Dynamo does not consult an lru_cache).
    build = window_layout.__wrapped__ if torch.compiler.is_compiling() else window_layout
    base = build(grid, window, shot_starts, context_frames, device, batch)
    block_of_row = block_of_rows(batch, grid, frames_per_block, device)
    return restrict_block_causal(base, block_of_row, grid[0] // frames_per_block)


def block_causal_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    frames_per_block: int,
    grid: Sequence[int],
    top_k: int = 1,
    window: WindowArg = None,
    frame_attention: bool = False,
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
    softmax_scale: float | None = None,
    backend: str = "auto",
    routing: Routing | None = None,
) -> torch.Tensor:
    """:func:`moga.modules.moga_layer_attention` with every branch restricted to block-causal keys.

    Args:
        q: (B, N, Hq, D); k, v: (B, N, Hkv, D); router_logits: (B, N, M).
        frames_per_block: latent frames per causal block (the grid's frame count must be a multiple of it).
        grid: (T, H, W), T * H * W == N (required: the blocks are frames).
        top_k, window, frame_attention, shot_starts, context_frames, softmax_scale, backend: as in
            :func:`moga.modules.moga_layer_attention`.
        routing: ``route_tokens(router_logits, top_k)`` when the caller has it (to reuse it); None: routed here.

    Returns: (B, N, Hq, D) in the dtype of q.
    """
    B, N, Hq, D = q.shape
    T, H, W = check_grid(grid, N)
    if isinstance(frames_per_block, bool) or not isinstance(frames_per_block, int) or frames_per_block < 1:
        raise ValueError(f"frames_per_block must be a positive int, got {frames_per_block!r}")
    if T % frames_per_block:
        raise ValueError(f"the grid's {T} frames are not a multiple of frames_per_block={frames_per_block}")
    num_blocks = T // frames_per_block
    scale = softmax_scale_or_default(softmax_scale, D)
    block_of_row = block_of_rows(B, (T, H, W), frames_per_block, q.device)
    cached = not torch.compiler.is_compiling()  # Dynamo traces the builder itself, as for window_layout
    static_build = block_causal_window_layout if cached else block_causal_window_layout.__wrapped__

    shots = normalize_shot_starts(shot_starts, T)
    routing = _routing_of(router_logits, top_k, routing)
    return _branch_mean(
        q, k, v, routing, lambda layout: restrict_block_causal(layout, block_of_row, num_blocks), top_k=top_k,
        grid=(T, H, W), window=window, frame_attention=frame_attention, shots=shots, context_frames=context_frames,
        scale=scale, backend=backend,
        static_layout=lambda grid, win, shots, ctx, device, batch: static_build(
            grid, win, shots, ctx, device, batch, frames_per_block
        ),
    )  # fmt: skip
