"""Longest-processing-time-first tile tables for the persistent contiguous kernels.

The contiguous kernels run a persistent grid: each program takes work items ``i, i + P, i + 2P, ...`` from one
table. A work item is (tile row, head). Ordering the rows by the length of what each tile loops over (keys for the
forward and dq, queries for dk/dv), longest first, makes a skewed layout (one huge group, many small ones) start
its long tiles first, so the programs finish together instead of a few long tiles running alone at the end (the
classic LPT schedule). Everything runs on the device: no host synchronisation.
"""

from __future__ import annotations

import torch

from moga.kernels.segment_attention.tiles import OTHER_END, OTHER_START, SEG_END, TILE_START, build_tile_table


def lpt_tile_table(
    tile_offsets: torch.Tensor, other_offsets: torch.Tensor, length: int, block: int, include_tail: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tile table of :func:`moga.kernels.segment_attention.tiles.build_tile_table` with its non-empty rows
    first, ordered by descending loop length (``other_end - other_start``; ties keep segment order), and their count.

    Returns:
        table: (bound, 4) int32 rows ``[tile_start, segment_end, other_start, other_end]`` (TMA coordinates are
            32-bit: callers keep lengths below 2^31). Rows past the count are empty (all zero).
        count: (1,) int32 on the device, the number of non-empty rows (kernels loop over exactly those).
    """
    table = build_tile_table(tile_offsets, other_offsets, length, block, include_tail)
    nonempty = table[:, SEG_END] > table[:, TILE_START]
    # Non-empty rows by descending work (a tail row or a segment without keys has work 0 but still writes its
    # zero outputs), then the empty rows.
    key = torch.where(nonempty, table[:, OTHER_END] - table[:, OTHER_START] + 1, 0)
    order = torch.sort(key, descending=True, stable=True).indices
    count = nonempty.sum().to(torch.int32).reshape(1)
    return table.index_select(0, order).to(torch.int32).contiguous(), count
