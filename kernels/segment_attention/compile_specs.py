"""Every production launch configuration of the segment-attention kernels, for the no-GPU compile check."""

from __future__ import annotations

from dataclasses import replace

import torch

from moga.kernels.compile_spec import CompileSpec
from moga.kernels.segment_attention import reduce
from moga.kernels.segment_attention.bwd import (
    segment_attn_bwd_dkdv_kernel,
    segment_attn_bwd_dq_kernel,
    segment_attn_bwd_preprocess_kernel,
)
from moga.kernels.segment_attention.configs import DTYPES, HEAD_DIMS, KernelConfig, production_config
from moga.kernels.segment_attention.fwd import segment_attn_fwd_kernel

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# GQA ratio compiled: the others only divide by it, the dk/dv kernel loops over it, so it is also compiled for
# GROUP=1 (plain multi-head attention, the common case, where that loop disappears and registers differ).
_GROUP = 2


def _strides(*names: str) -> dict[str, str]:
    return {name: "i64" for name in names}


def fwd_spec(D: int, dtype: torch.dtype, cfg: KernelConfig) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    signature = {
        "Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "Out": f"*{t}", "Lse": "*fp32",
        "Q_index": "*i64", "K_index": "*i64", "Tiles": "*i64",
        **_strides("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                   "stride_ot", "stride_oh", "stride_lh"),
        "qk_scale": "fp32",
    }  # fmt: skip
    constexprs = dict(
        GROUP=_GROUP, D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, UPCAST=False, IEEE=dtype == torch.float32
    )
    return _spec("segment_attn_fwd", t, D, cfg, segment_attn_fwd_kernel, signature, constexprs)


def preprocess_spec(D: int, dtype: torch.dtype, cfg: KernelConfig) -> CompileSpec:
    t = _TRITON_DTYPE[dtype]
    signature = {
        "Out": f"*{t}", "DOut": f"*{t}", "Delta": "*fp32", "num_positions": "i64",
        **_strides("stride_ot", "stride_oh", "stride_dot", "stride_doh", "stride_lh"),
    }  # fmt: skip
    constexprs = dict(D=D, BLOCK_M=cfg.block_m)
    return _spec("segment_attn_bwd_preprocess", t, D, cfg, segment_attn_bwd_preprocess_kernel, signature, constexprs)


def grad_spec(
    kernel: str, D: int, dtype: torch.dtype, cfg: KernelConfig, scatter: bool, group: int = _GROUP
) -> CompileSpec:
    """dk/dv or dq kernel; scatter=True writes token rows in the input dtype, False fp32 per-position rows."""
    t = _TRITON_DTYPE[dtype]
    g = t if scatter else "fp32"
    inputs = {
        "Q": f"*{t}", "K": f"*{t}", "V": f"*{t}", "DOut": f"*{t}", "Lse": "*fp32", "Delta": "*fp32",
    }  # fmt: skip
    if kernel == "dkdv":
        fn = segment_attn_bwd_dkdv_kernel
        grads = {"DK": f"*{g}", "DV": f"*{g}"}
        grad_strides = _strides("stride_dkt", "stride_dkh", "stride_dvt", "stride_dvh")
    else:
        fn = segment_attn_bwd_dq_kernel
        grads = {"DQ": f"*{g}"}
        grad_strides = _strides("stride_dqt", "stride_dqh")
    signature = {
        **inputs, **grads, "Q_index": "*i64", "K_index": "*i64", "Tiles": "*i64",
        **_strides("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                   "stride_dot", "stride_doh", "stride_lh"),
        **grad_strides, "qk_scale": "fp32", "sm_scale": "fp32",
    }  # fmt: skip
    constexprs = dict(
        GROUP=group,
        D=D,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        SCATTER=scatter,
        UPCAST=False,
        IEEE=dtype == torch.float32,
    )
    name = f"segment_attn_bwd_{kernel}{'' if scatter else '_perpos'}{'' if group == _GROUP else f'_g{group}'}"
    return _spec(name, t, D, cfg, fn, signature, constexprs)


def reduce_spec(dtype: torch.dtype) -> CompileSpec:
    """The per-token sum of per-position gradient rows (independent of the head dim)."""
    t = _TRITON_DTYPE[dtype]
    signature = {
        "Grad": "*fp32",
        "Order": "*i64",
        "Starts": "*i64",
        "Out": f"*{t}",
        "row_size": "i64",
        "BLOCK": "constexpr",
    }
    return CompileSpec(
        name=f"segment_attn_bwd_reduce[{t},BLOCK={reduce.BLOCK},w{reduce.NUM_WARPS},s1]",
        fn=reduce.segment_attn_bwd_reduce_kernel, signature=signature, constexprs={"BLOCK": reduce.BLOCK},
        num_warps=reduce.NUM_WARPS, num_stages=1,
    )  # fmt: skip


def _spec(name, t, D, cfg, fn, signature, constexprs) -> CompileSpec:
    signature.update({key: "constexpr" for key in constexprs})
    label = f"{name}[{t},D={D},BM={cfg.block_m},BN={cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}]"
    return CompileSpec(
        name=label, fn=fn, signature=signature, constexprs=constexprs,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _kernel_specs(kernel: str, D: int, dtype: torch.dtype, cfg: KernelConfig) -> list[CompileSpec]:
    if kernel == "fwd":
        return [fwd_spec(D, dtype, cfg)]
    if kernel == "preprocess":
        return [preprocess_spec(D, dtype, cfg)]
    groups = (_GROUP, 1) if kernel == "dkdv" else (_GROUP,)
    return [grad_spec(kernel, D, dtype, cfg, scatter, group) for group in groups for scatter in (True, False)]


def compile_specs() -> list[CompileSpec]:
    """Every kernel (fwd, bwd preprocess, dk/dv (GQA and MHA) and dq in both output modes) for D in HEAD_DIMS x
    DTYPES, and the gradient reduction per dtype. A configuration with a Hopper replacement is checked for sm_80 only, and the
    replacement for sm_90a only."""
    specs = []
    for D in HEAD_DIMS:
        for dtype in DTYPES:
            for kernel in ("fwd", "preprocess", "dkdv", "dq"):
                base = production_config(kernel, D, dtype)
                hopper = production_config(kernel, D, dtype, hopper=True)
                if hopper == base:
                    specs += _kernel_specs(kernel, D, dtype, base)
                else:
                    specs += [replace(s, archs=("sm_80",)) for s in _kernel_specs(kernel, D, dtype, base)]
                    specs += [replace(s, archs=("sm_90a",)) for s in _kernel_specs(kernel, D, dtype, hopper)]
    specs += [reduce_spec(dtype) for dtype in DTYPES]
    return specs
