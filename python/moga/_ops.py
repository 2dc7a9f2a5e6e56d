"""The compiled operators ``torch.ops.moga.*`` (extension ``moga._C``, built from ``csrc/``).

Importing this module loads the extension when it was built, and registers fake (meta) implementations so
``torch.compile`` can trace calls to the ops without running them. The schemas (``csrc/ops.cpp``):

* ``sort_by_segment(keys (L,) int64, num_segments) -> (order (L,) int64, offsets (S + 1,) int64)``
* ``segment_attention_fwd(q, k, v, q_index, q_offsets, k_index, k_offsets, scale) -> (out (Lq, Hq, D),
  lse (Hq, Lq) float32)``
* ``segment_attention_bwd(dout, q, k, v, out, lse, q_index, q_offsets, k_index, k_offsets, scale, q_unique,
  k_unique) -> (dq like q, dk like k, dv like v)``
* ``gated_unpermute(out_seg (T * K, H, D), position (T * K,) int64, gates (T, K)) -> out (T, H, D)``
* ``gated_unpermute_bwd(dout (T, H, D), out_seg, position, gates) -> (d_out_seg like out_seg,
  d_gates like gates)``
"""

from __future__ import annotations

import torch

from moga import _alloc

OP_NAMES = (
    "sort_by_segment",
    "segment_attention_fwd",
    "segment_attention_bwd",
    "gated_unpermute",
    "gated_unpermute_bwd",
)

try:
    from moga import _C
except ImportError as exc:  # built without the extension (MOGA_BUILD_EXT=0) or a broken build
    _C = None
    _LOAD_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _LOAD_ERROR = None


def load_error() -> str | None:
    """Why ``moga._C`` could not be imported, or None when it is loaded."""
    return _LOAD_ERROR


def _registered_kernels() -> dict[tuple[str, str], bool]:
    """(device type, op name) -> whether the loaded extension has a kernel for it (fixed once loaded)."""
    if _C is None:
        return {}
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return {
        (device, name): torch._C._dispatch_has_kernel_for_dispatch_key(f"moga::{name}", key)
        for device, key in keys.items()
        for name in OP_NAMES
    }


# Computed once so that ops_available is a plain lookup (cheap, and traceable by torch.compile).
_KERNELS = _registered_kernels()


def ops_available(device_type: str = "cpu", op: str | None = None) -> bool:
    """Whether the extension is loaded and registers a kernel for ``device_type`` ("cpu", "cuda").

    With ``op`` (one of :data:`OP_NAMES`), whether that op has one; otherwise whether all of them do.
    """
    names = OP_NAMES if op is None else (op,)
    return all(_KERNELS.get((device_type, name), False) for name in names)


_poison_in_ops = False


def sync_poison_outputs() -> None:
    """Make the compiled ops NaN-fill their outputs exactly while :func:`moga._alloc.poisoned_outputs` is active."""
    global _poison_in_ops
    if torch.compiler.is_compiling():  # traced code never allocates for real; keep the C call out of graphs
        return
    if _C is not None and _alloc._poison != _poison_in_ops:
        _C._set_poison_outputs(_alloc._poison)
        _poison_in_ops = _alloc._poison


if _C is not None:

    @torch.library.register_fake("moga::sort_by_segment")
    def _sort_by_segment_fake(keys: torch.Tensor, num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
        return keys.new_empty(keys.shape), keys.new_empty(num_segments + 1)

    @torch.library.register_fake("moga::segment_attention_fwd")
    def _segment_attention_fwd_fake(q, k, v, q_index, q_offsets, k_index, k_offsets, scale):
        Lq, Hq, D = q_index.shape[0], q.shape[1], q.shape[2]
        return q.new_empty(Lq, Hq, D), q.new_empty(Hq, Lq, dtype=torch.float32)

    @torch.library.register_fake("moga::segment_attention_bwd")
    def _segment_attention_bwd_fake(
        dout, q, k, v, out, lse, q_index, q_offsets, k_index, k_offsets, scale, q_unique, k_unique
    ):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("moga::gated_unpermute")
    def _gated_unpermute_fake(out_seg, position, gates):
        return out_seg.new_empty(gates.shape[0], out_seg.shape[1], out_seg.shape[2])

    @torch.library.register_fake("moga::gated_unpermute_bwd")
    def _gated_unpermute_bwd_fake(dout, out_seg, position, gates):
        return out_seg.new_empty(out_seg.shape), gates.new_empty(gates.shape)
