"""Device-side tile table: which (segment, block start) each Triton program works on.

A grid must be sized from host-known numbers, but the segments' lengths live on the device. A layout with
L positions in n segments has at most ``cdiv(L, block) + n - 1`` tiles (``ceil(a) + ceil(b) <= ceil(a + b) + 1``),
so the grid has that many programs and a table, built here with torch ops on the device (no host
synchronisation), tells each program its tile; programs past the real tile count get an empty tile and
do nothing.
"""

from __future__ import annotations

import torch

# Columns of a tile table row.
TILE_START, SEG_END, OTHER_START, OTHER_END = range(4)


def tile_bound(length: int, num_segments: int, block: int) -> int:
    """Host-known upper bound on the tile count of ``num_segments`` segments covering ``length`` positions."""
    return max(-(-length // block) + num_segments - 1, 1)


def build_tile_table(
    tile_offsets: torch.Tensor,
    other_offsets: torch.Tensor,
    length: int,
    block: int,
    include_tail: bool,
) -> torch.Tensor:
    """Split every segment's positions into blocks.

    Args:
        tile_offsets: (S + 1,) int64 boundaries of the positions being tiled (queries for the forward and dq
            kernels, keys for the dk/dv kernel).
        other_offsets: (S + 1,) int64 boundaries of the positions each tile loops over (keys or queries).
        length: L, the number of positions being tiled (``tile_offsets[S] <= L``).
        block: tile size.
        include_tail: also tile the positions ``tile_offsets[S]:L`` that belong to no segment, as a pseudo
            segment with nothing to loop over, so that kernels write their zero outputs.

    Returns:
        (tile_bound(L, S + include_tail, block), 4) int64 rows ``[tile_start, segment_end, other_start,
        other_end]``: the tile covers positions ``tile_start:min(tile_start + block, segment_end)`` and loops
        over ``other_start:other_end``. Rows past the real tile count are all zero (an empty tile).
    """
    device = tile_offsets.device
    if include_tail:
        tile_offsets = torch.cat([tile_offsets, torch.full((1,), length, dtype=torch.int64, device=device)])
        other_offsets = torch.cat([other_offsets, other_offsets[-1:]])
    num_segments = tile_offsets.numel() - 1
    bound = tile_bound(length, num_segments, block)
    if num_segments == 0:
        return torch.zeros(bound, 4, dtype=torch.int64, device=device)
    tiles_per_segment = torch.div(tile_offsets[1:] - tile_offsets[:-1] + block - 1, block, rounding_mode="floor")
    tiles_end = torch.cumsum(tiles_per_segment, 0)  # (n,) tile id one past each segment's last tile
    tile_ids = torch.arange(bound, dtype=torch.int64, device=device)
    segment = torch.searchsorted(tiles_end, tile_ids, right=True)  # (bound,) == n past the last real tile
    valid = segment < num_segments
    segment = segment.clamp(max=num_segments - 1)
    first_tile = tiles_end[segment] - tiles_per_segment[segment]
    table = torch.stack(
        [
            tile_offsets[segment] + (tile_ids - first_tile) * block,
            tile_offsets[segment + 1],
            other_offsets[segment],
            other_offsets[segment + 1],
        ],
        dim=1,
    )
    return table * valid[:, None]
