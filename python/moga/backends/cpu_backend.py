"""Compiled CPU backend: ``moga::segment_attention_fwd/bwd`` from ``csrc/cpu`` (tiled online softmax, parallel
over (segment, tile, kv head) with at::parallel_for). fp16/bf16 inputs accumulate in float32, float64 inputs in
float64. Available when the extension ``moga._C`` was built.

The float32 tile products run moga's own AVX-512 GEMM where the CPU has AVX-512F, else the BLAS torch ships
(MKL or OpenBLAS); float64 always uses BLAS. Both accumulate in float32; they differ only in summation order.
:func:`set_gemm` / :func:`gemm` choose it (``"auto"``, ``"avx512"``, ``"blas"``), as does the environment variable
``MOGA_CPU_GEMM`` read at import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from moga import _ops
from moga.backends import _compiled
from moga.backends._autograd import segment_attention_autograd
from moga.layout import SegmentLayout

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_available() -> bool:
    return _ops.ops_available("cpu")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    if not is_available():
        return f"the compiled extension moga._C with CPU kernels is not loaded ({_ops.load_error()})"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu":
            return f"{name} is on {t.device}; the cpu backend runs CPU tensors only"
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} has dtype {t.dtype}; the cpu backend supports float16, bfloat16, float32 and float64"
    return None


def segment_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout, softmax_scale: float
) -> torch.Tensor:
    """q (T, Hq, D), k/v (T, Hkv, D) -> (Lq, Hq, D) in segment order; rows outside segments are zero."""
    return segment_attention_autograd(q, k, v, layout, softmax_scale, _compiled.fwd, _compiled.bwd)


GEMM_CHOICES = ("auto", "avx512", "blas")


def set_gemm(name: str) -> str:
    """Select the float32 GEMM of the cpu backend: ``"auto"`` (AVX-512 where supported, else BLAS), ``"avx512"``
    or ``"blas"``. Returns the previous setting. Process-wide.

    Raises ValueError for another name, for ``"avx512"`` on a CPU without AVX-512F, and RuntimeError when the
    extension is not loaded.
    """
    if name not in GEMM_CHOICES:
        raise ValueError(f"moga: cpu gemm must be one of {GEMM_CHOICES}, got {name!r}")
    if _ops._C is None:
        raise RuntimeError(f"moga: the compiled extension moga._C is not loaded ({_ops.load_error()})")
    return _ops._C._set_cpu_gemm(name)


def avx512_supported() -> bool:
    """Whether this CPU (and build of ``moga._C``) can run the AVX-512 GEMM; False without the extension."""
    return _ops._C is not None and bool(_ops._C._cpu_avx512_supported())


def gemm_in_use() -> str | None:
    """``"avx512"`` or ``"blas"``: what the cpu backend's float32 products run now; None without the extension."""
    return None if _ops._C is None else _ops._C._cpu_gemm_in_use()


@contextlib.contextmanager
def gemm(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_gemm`; restores the previous setting on exit."""
    previous = set_gemm(name)
    try:
        yield
    finally:
        set_gemm(previous)


if _ops._C is not None and os.environ.get("MOGA_CPU_GEMM"):
    set_gemm(os.environ["MOGA_CPU_GEMM"].strip().lower())
