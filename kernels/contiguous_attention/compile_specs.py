"""Every production configuration of the contiguous kernels, for the no-GPU compile check (sm_90a only: TMA,
wgmma and warp specialisation are Hopper's)."""

from __future__ import annotations

import torch

from moga.kernels.compile_spec import CompileSpec
from moga.kernels.contiguous_attention.bwd import (
    contiguous_attn_bwd_dkdv_kernel,
    contiguous_attn_bwd_dq_kernel,
)
from moga.kernels.contiguous_attention.configs import DTYPES, HEAD_DIMS, HOPPER, ContiguousConfig
from moga.kernels.contiguous_attention.fwd import contiguous_attn_fwd_kernel

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16"}
# Query heads per kv head compiled (1: plain multi-head attention; the kernels only divide by it).
_GROUP = 1
_HQ = 8


def _spec(name: str, t: str, D: int, cfg: ContiguousConfig, fn, signature: dict, constexprs: dict) -> CompileSpec:
    signature = {**signature, **{key: "constexpr" for key in constexprs}}
    label = (
        f"{name}[{t},D={D},BM={cfg.block_m},BN={cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}"
        f"{',ws' if cfg.warp_specialize else ''}]"
    )
    return CompileSpec(
        name=label, fn=fn, signature=signature, constexprs=constexprs, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, archs=("sm_90a",),
    )  # fmt: skip


def fwd_spec(D: int, dtype: torch.dtype, cfg: ContiguousConfig) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    signature = {
        "Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Out": f"*{t}", "Lse": "*fp32", "Tiles": "*i32",
        "Num_tiles": "*i32", "stride_lh": "i64", "qk_scale": "fp32",
    }  # fmt: skip
    constexprs = dict(
        HQ=_HQ, GROUP=_GROUP, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
        WARP_SPECIALIZE=cfg.warp_specialize, UPCAST=False,
    )
    return _spec("contiguous_attn_fwd", t, D, cfg, contiguous_attn_fwd_kernel, signature, constexprs)


def grad_spec(kernel: str, D: int, dtype: torch.dtype, cfg: ContiguousConfig, group: int = _GROUP) -> CompileSpec:
    """The dq or dk/dv kernel; dk/dv also for GQA (its loop runs over the query heads of a kv head)."""
    t = _TRITON_DTYPE[dtype]
    grads = {"DQ": f"*{t}"} if kernel == "dq" else {"DK": f"*{t}", "DV": f"*{t}"}
    signature = {
        "Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "DOut": f"*{t}", "Lse": "*fp32", "Delta": "*fp32", **grads,
        "Tiles": "*i32", "Num_tiles": "*i32", "stride_lh": "i64", "qk_scale": "fp32", "sm_scale": "fp32",
    }  # fmt: skip
    constexprs = dict(
        HQ=_HQ, GROUP=group, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
        WARP_SPECIALIZE=cfg.warp_specialize, UPCAST=False,
    )
    fn = contiguous_attn_bwd_dq_kernel if kernel == "dq" else contiguous_attn_bwd_dkdv_kernel
    name = f"contiguous_attn_bwd_{kernel}{'' if group == _GROUP else f'_g{group}'}"
    return _spec(name, t, D, cfg, fn, signature, constexprs)


def compile_specs() -> list[CompileSpec]:
    """Forward, dq and dk/dv (MHA and GQA) for every head dim and 16-bit dtype of the table (the delta preprocess
    is the segment package's kernel, checked with its specs)."""
    specs = []
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            specs.append(fwd_spec(D, dtype, HOPPER[("fwd", D)]))
            specs.append(grad_spec("dq", D, dtype, HOPPER[("dq", D)]))
            specs += [grad_spec("dkdv", D, dtype, HOPPER[("dkdv", D)], group) for group in (_GROUP, 2)]
    return specs
