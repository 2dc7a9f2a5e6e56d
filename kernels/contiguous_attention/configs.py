"""Launch configurations of the contiguous kernels and what the running Triton offers for Hopper.

Configurations are keyed by (kernel, head dim); only 16-bit inputs are supported (TMA tiles of fp16/bf16 feeding
wgmma). Under the Triton interpreter one small configuration is used (small tiles exercise the multi-tile loops,
unequal BM/BN catch a mixed-up mask) and the persistent grid has a few programs so that each walks several items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moga.kernels.segment_attention.configs import interpreting

HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ContiguousConfig:
    """block_m: query rows per tile; block_n: key rows per tile; num_stages: buffers of the pipelined loop."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool


INTERPRETER_CONFIG = ContiguousConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, warp_specialize=False)
INTERPRETER_PROGRAMS = 3

# (kernel, D) -> configuration for sm_90a, chosen by compiling (bench/compile_check.py, Triton 3.8 and 3.6): warp
# specialised (setmaxnreg in the PTX), TMA and wgmma, no spills, within 227 KB of shared memory. num_warps is per
# consumer warpgroup set: with warp specialisation Triton adds a producer warpgroup, and a 128-row forward tile is
# split over two consumer warpgroups (12 warps in all, FA3's layout). The backward keeps 64 rows on the split
# dimension (dq: queries, dk/dv: BM queries per step) because Triton's data partitioner rejects the plain [BM] loads
# of lse and delta next to a split tile. Never timed yet (no GPU run): bench/tile_sweep.py is where they get measured.
HOPPER = {
    ("fwd", 64): ContiguousConfig(128, 128, 4, 3, True),
    ("fwd", 128): ContiguousConfig(128, 128, 4, 2, True),
    ("dq", 64): ContiguousConfig(64, 128, 4, 2, True),
    ("dq", 128): ContiguousConfig(64, 64, 4, 2, True),
    ("dkdv", 64): ContiguousConfig(64, 128, 4, 2, True),
    ("dkdv", 128): ContiguousConfig(32, 64, 4, 2, True),
}


def config(kernel: str, head_dim: int) -> ContiguousConfig:
    """The configuration to launch: the interpreter's under TRITON_INTERPRET=1, else Hopper's."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"contiguous kernels support head dims {HEAD_DIMS}, got {head_dim}")
    if interpreting():
        return INTERPRETER_CONFIG
    return HOPPER[(kernel, head_dim)]


def num_programs(device: torch.device, work: int) -> int:
    """Persistent grid size: one program per SM (at most ``work``), a few under the interpreter."""
    if interpreting() or device.type != "cuda":
        return max(1, min(work, INTERPRETER_PROGRAMS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(work, sms))

