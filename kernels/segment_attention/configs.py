"""Launch configurations (block sizes, warps, pipeline stages) of the segment-attention kernels.

One table per kernel, keyed by (head dim, dtype), plus Hopper (sm_90) entries where Hopper can take larger
tiles. Every entry is compiled by the no-GPU compile check (``compile_specs()`` in ``__init__``) for each
architecture that launches it (table entries: sm_80 and sm_90a unless overridden; ``HOPPER``: sm_90a) and
must use no local memory (no register spills) and fit that architecture's shared memory. Under the Triton interpreter a
single small configuration is used: the interpreter cannot autotune, and small tiles exercise the
multi-tile loops with small test inputs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# The tables' head-dim keys: the tile widths D_PAD the kernels are compiled for. Any head dim D in
# [MIN_HEAD_DIM, MAX_HEAD_DIM] runs in tiles of padded_head_dim(D) columns, the columns >= D masked off.
HEAD_DIMS = (32, 64, 128, 256)
MIN_HEAD_DIM, MAX_HEAD_DIM = 1, 256
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
# spill bytes for both sm_90a and sm_80 (ptxas -v, gathered rows, fp16 and bf16 alike), and without serialised
# wgmma on sm_90a, under BOTH Tritons the project meets: 3.8 (torch 2.14's pin: CI, development) and 3.6 (the GPU
# machine's torch 2.11). `make compile-check` checks both; one table serves both (no per-version entries needed).
# fp32 uses exact IEEE products (FMA, no tensor cores), which needs far more registers: hence the small tiles.

# Forward: tile of block_m queries, loop over keys in block_n steps.
FWD = {
    (32, _16BIT): KernelConfig(128, 64, 8, 3),
    (64, _16BIT): KernelConfig(128, 64, 8, 3),
    # 3 stages, not 2: Triton's pipeliner only prefetches the k_index load (one indirection before the K/V
    # gathers) when num_stages > 2; with 2 its latency is paid synchronously every key step.
    (128, _16BIT): KernelConfig(128, 32, 8, 3),
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
    # (64, 64, 8, 2) was clean under Triton 3.8 only: under 3.6 it spilled 48 bytes on sm_90a (GQA group 2), 8 on
    # sm_80 (per-position rows) and its wgmma got serialised (C7515) in the per-position MHA variant; (64, 64, 8, 1)
    # and (64, 32, 8, 2) spilled 8-16 bytes, (32, 64, 8, 2) had one C7515 row (3.6, sm_90a, per-position MHA).
    # Of 12 candidates tried, (32, 64, 8, 1) alone was clean on both (165-217 registers, 48-57 KB shared memory);
    # the (32, 128, 8, 1|2) tiles spilled 116-436 bytes on sm_80 under 3.8.
    (128, _16BIT): KernelConfig(32, 64, 8, 1),
    (256, _16BIT): KernelConfig(32, 32, 8, 1),
    # (32, 64, 8, 2) spilled 32 bytes on sm_90a under Triton 3.6 (GQA group 2); 1 stage: 98-128 registers on both.
    (32, _FP32): KernelConfig(32, 64, 8, 1),
    # (16, 16, 4, 1) spilled 16-32 bytes on sm_80 under Triton 3.6; (16, 64, 8, 1): 98-128 registers on both.
    # (16, 32, 4 or 8, 1), (32, 16, 4, 1) and (16, 16, 4, 2) each spilled in some variant under one of the two.
    (64, _FP32): KernelConfig(16, 64, 8, 1),
    # (16, 16, 8, 1) and (16, 16, 16, 1) spilled 12-24 bytes once compiled for GROUP=1 (plain multi-head).
    (128, _FP32): KernelConfig(16, 32, 8, 1),
    (256, _FP32): KernelConfig(16, 32, 16, 1),
}

# dq: tile of block_m queries, loop over keys in block_n steps.
DQ = {
    (32, _16BIT): KernelConfig(64, 64, 4, 2),
    (64, _16BIT): KernelConfig(128, 64, 8, 2),
    (128, _16BIT): KernelConfig(128, 32, 8, 3),  # 3 stages: the k_index load is prefetched too (see FWD)
    (256, _16BIT): KernelConfig(64, 32, 8, 2),
    (32, _FP32): KernelConfig(64, 32, 8, 2),
    (64, _FP32): KernelConfig(64, 32, 8, 2),
    (128, _FP32): KernelConfig(32, 16, 4, 1),
    (256, _FP32): KernelConfig(16, 16, 4, 1),
}

# Backward preprocess (delta = rowsum(dout * out)): only block_m is used.
PREPROCESS = {(d, kind): KernelConfig(max(16, 4096 // d), 0, 4, 1) for d in HEAD_DIMS for kind in (_16BIT, _FP32)}

TABLES = {"fwd": FWD, "dkdv": DKDV, "dq": DQ, "preprocess": PREPROCESS}

# Hopper (compute capability 9.x) entries that replace the tables' above. With wgmma accumulators the forward
# at D=128 holds a 64-key tile without spilling (208 registers on sm_90a), where sm_80's mma.sync layout
# spills (255 registers + 204 bytes): the tables must suit sm_80, so the larger tile is Hopper's alone.
HOPPER = {
    ("fwd", 128, _16BIT): KernelConfig(128, 64, 8, 3),
}


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return _16BIT
    if dtype == torch.float32:
        return _FP32
    raise TypeError(f"segment attention kernels support float16, bfloat16 and float32, got {dtype}")


def padded_head_dim(head_dim: int) -> int:
    """D_PAD, the tile width for head dim ``head_dim``: the smallest of HEAD_DIMS >= head_dim (a power of two,
    at least 32: tl.dot needs 16 and the tables start at 32, so D < 32 costs what D = 32 costs)."""
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    return next(d for d in HEAD_DIMS if d >= head_dim)


def production_config(kernel: str, head_dim: int, dtype: torch.dtype, hopper: bool = False) -> KernelConfig:
    """The GPU configuration of ``kernel`` ("fwd", "dkdv", "dq" or "preprocess") for any head dim in
    [MIN_HEAD_DIM, MAX_HEAD_DIM], looked up by its tile width ``padded_head_dim(head_dim)``; ``hopper``: for sm_90."""
    d_pad = padded_head_dim(head_dim)
    kind = _dtype_kind(dtype)
    if hopper and (kernel, d_pad, kind) in HOPPER:
        return HOPPER[(kernel, d_pad, kind)]
    return TABLES[kernel][(d_pad, kind)]


def is_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9.x (host metadata, cached by torch: no synchronisation)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def config(kernel: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> KernelConfig:
    """The configuration to launch on ``device``: the interpreter's under TRITON_INTERPRET=1, else an active
    ``override()`` of (kernel, padded_head_dim(head_dim), dtype), else the production one for the device's
    architecture."""
    if interpreting():
        return INTERPRETER_CONFIG if kernel != "preprocess" else production_config(kernel, head_dim, dtype)
    key = (kernel, padded_head_dim(head_dim), dtype)
    if key in _OVERRIDES:  # set by override(): a tile sweep's candidate
        return _OVERRIDES[key]
    return production_config(kernel, head_dim, dtype, hopper=is_hopper(device))


# ---------------------------------------------------------------- override (tile sweeps)

_OVERRIDES: dict[tuple[str, int, torch.dtype], KernelConfig] = {}


@contextlib.contextmanager
def override(kernel: str, head_dim: int, dtype: torch.dtype, cfg: KernelConfig) -> Iterator[KernelConfig]:
    """Inside the ``with`` block, ``config(kernel, d, dtype, device)`` returns ``cfg`` on every GPU for every head
    dim ``d`` with the tile width of ``head_dim``.

    For tile sweeps (``bench/tile_sweep.py``): time a candidate configuration through the library's own entry
    points without editing the tables. The key is the tile width ``padded_head_dim(head_dim)``, as in the tables
    (the kernels run, and ask ``config`` for, the padded width: an override at D = 80 is the one at 128), and
    ``dtype`` itself (overriding bfloat16 leaves float16 alone). Under the Triton interpreter the override is
    ignored (the interpreter always runs ``INTERPRETER_CONFIG``). On exit, normal or by an exception, the previous
    state returns (an enclosing override of the same key included). Not thread-safe: the overrides are one
    module-level dict. Triton's JIT cache keys on the constexpr block sizes, so each new ``cfg`` compiles once.

        with configs.override("dkdv", 128, torch.bfloat16, KernelConfig(32, 128, 8, 2)):
            out.backward(grad)  # the dk/dv kernel runs with BM=32, BN=128, 8 warps, 2 stages

    The candidate is not compile-checked: it may spill or exceed shared memory (compile it with
    ``bench/compile_check.py`` first); an invalid one fails at launch, not here, except for block sizes that are not
    powers of two (``tl.arange`` needs them), which raise ValueError here.
    """
    if kernel not in TABLES:
        raise ValueError(f"kernel must be one of {sorted(TABLES)}, got {kernel!r}")
    width = padded_head_dim(head_dim)  # validates the head dim
    _dtype_kind(dtype)  # validates the dtype
    if not isinstance(cfg, KernelConfig):
        raise TypeError(f"cfg must be a KernelConfig, got {type(cfg).__name__}")
    blocks = (cfg.block_m,) if kernel == "preprocess" else (cfg.block_m, cfg.block_n)
    if any(b < 1 or b & (b - 1) for b in blocks) or cfg.num_warps < 1 or cfg.num_stages < 1:
        raise ValueError(f"block sizes must be powers of two and warps, stages >= 1, got {cfg}")
    key = (kernel, width, dtype)
    previous = _OVERRIDES.get(key)
    _OVERRIDES[key] = cfg
    try:
        yield cfg
    finally:
        if previous is None:
            del _OVERRIDES[key]
        else:
            _OVERRIDES[key] = previous
