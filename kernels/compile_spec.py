"""What the no-GPU compile check needs to know about a production kernel configuration.

Every kernel package exposes ``compile_specs() -> list[CompileSpec]`` listing each configuration the
library can launch in production (all head dims, dtypes, block sizes and autotune candidates);
``bench/compile_check.py`` compiles each for sm_80 and sm_90a (or the spec's own ``archs``) and reads registers,
spills and shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileSpec:
    name: str  # e.g. "segment_attn_fwd[bf16,D=128,BM=128,BN=64,w8,s3]"
    fn: Any  # a @triton.jit function
    signature: dict[str, str]  # Triton AOT signature, e.g. {"Q": "*bf16", "stride_qt": "i64", "D": "constexpr"}
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    # Architectures that launch this configuration ("sm_80", "sm_90a"); empty: every architecture checked.
    archs: tuple[str, ...] = ()
