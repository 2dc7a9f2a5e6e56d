"""Launch configurations (block sizes, warps, pipeline stages) of the segment-attention kernels.

One table per kernel, keyed by (head dim, dtype). Every entry is compiled for sm_80 and sm_90a by the
no-GPU compile check (``compile_specs()`` in ``__init__``) and must use no local memory (no register
spills) and fit the smaller of the two shared memories (163 KB on sm_80). Under the Triton interpreter a
single small configuration is used: the interpreter cannot autotune, and small tiles exercise the
multi-tile loops with small test inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

HEAD_DIMS = (32, 64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class KernelConfig:
    """block_m: query positions per tile; block_n: key positions per tile."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Different block sizes for queries and keys, so that a mixed-up mask or offset cannot pass the tests.
INTERPRETER_CONFIG = KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1)

_16BIT, _FP32 = "16bit", "fp32"

# Each entry is the first of a preference-ordered candidate list (larger tiles first) that compiled with zero
# spill bytes for both sm_90a and sm_80 (Triton 3.8 + ptxas -v, gathered rows, fp16 and bf16 alike).
# fp32 uses exact IEEE products (FMA, no tensor cores), which needs far more registers: hence the small tiles.

# Forward: tile of block_m queries, loop over keys in block_n steps.
FWD = {
    (32, _16BIT): KernelConfig(128, 64, 8, 3),
    (64, _16BIT): KernelConfig(128, 64, 8, 3),
    (128, _16BIT): KernelConfig(128, 32, 8, 2),
    (256, _16BIT): KernelConfig(64, 32, 8, 2),
    (32, _FP32): KernelConfig(64, 32, 4, 2),
    (64, _FP32): KernelConfig(32, 32, 4, 1),
    (128, _FP32): KernelConfig(32, 16, 8, 1),
    (256, _FP32): KernelConfig(32, 16, 8, 1),
}

# dk/dv: tile of block_n keys, loop over queries in block_m steps (and over the kv head's query heads).
DKDV = {
    (32, _16BIT): KernelConfig(32, 128, 8, 2),
    (64, _16BIT): KernelConfig(32, 128, 8, 2),
    (128, _16BIT): KernelConfig(64, 64, 8, 2),
    (256, _16BIT): KernelConfig(32, 32, 8, 1),
    (32, _FP32): KernelConfig(32, 64, 8, 2),
    (64, _FP32): KernelConfig(16, 16, 4, 1),
    (128, _FP32): KernelConfig(16, 16, 8, 1),
    (256, _FP32): KernelConfig(16, 16, 16, 1),
}

# dq: tile of block_m queries, loop over keys in block_n steps.
DQ = {
    (32, _16BIT): KernelConfig(64, 64, 4, 2),
    (64, _16BIT): KernelConfig(128, 64, 8, 2),
    (128, _16BIT): KernelConfig(128, 32, 8, 2),
    (256, _16BIT): KernelConfig(64, 32, 8, 2),
    (32, _FP32): KernelConfig(64, 32, 8, 2),
    (64, _FP32): KernelConfig(64, 32, 8, 2),
    (128, _FP32): KernelConfig(32, 16, 4, 1),
    (256, _FP32): KernelConfig(16, 16, 4, 1),
}

# Backward preprocess (delta = rowsum(dout * out)): only block_m is used.
PREPROCESS = {(d, kind): KernelConfig(max(16, 4096 // d), 0, 4, 1) for d in HEAD_DIMS for kind in (_16BIT, _FP32)}

TABLES = {"fwd": FWD, "dkdv": DKDV, "dq": DQ, "preprocess": PREPROCESS}


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return _16BIT
    if dtype == torch.float32:
        return _FP32
    raise TypeError(f"segment attention kernels support float16, bfloat16 and float32, got {dtype}")


def production_config(kernel: str, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The GPU configuration of ``kernel`` ("fwd", "dkdv", "dq" or "preprocess")."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    return TABLES[kernel][(head_dim, _dtype_kind(dtype))]


def config(kernel: str, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The configuration to launch: the interpreter's under TRITON_INTERPRET=1, else the production one."""
    cfg = production_config(kernel, head_dim, dtype)
    if interpreting():
        return INTERPRETER_CONFIG if kernel != "preprocess" else cfg
    return cfg
