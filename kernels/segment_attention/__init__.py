"""Fused Triton segment attention (forward and backward) on a :class:`moga.layout.SegmentLayout`.

* :func:`segment_attention_fwd` / :func:`segment_attention_bwd`: the kernel pair for
  :func:`moga.backends._autograd.segment_attention_autograd`;
* :func:`segment_attention_naive`: the literal PyTorch definition;
* :func:`compile_specs`: every production configuration, for the no-GPU compile check.

Dtypes float16, bfloat16, float32; head dims 1 to 256: the kernels are compiled for 32, 64, 128 and 256 and any
other head dim is zero-padded on the host to the next of these (``launch.pad_head_dim``), so only compile-checked
code runs. Every launch runs on its inputs' CUDA device (``launch.device_guard``).
"""

from moga.kernels.segment_attention.bwd import segment_attention_bwd
from moga.kernels.segment_attention.compile_specs import compile_specs
from moga.kernels.segment_attention.fwd import segment_attention_fwd
from moga.kernels.segment_attention.naive import segment_attention_naive

__all__ = ["compile_specs", "segment_attention_bwd", "segment_attention_fwd", "segment_attention_naive"]
