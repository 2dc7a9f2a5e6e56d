"""Sequence parallelism for MoGA over torch.distributed (NCCL on GPUs, gloo on CPUs).

* :func:`ulysses_moga_attention`, :func:`ulysses_group_attention`: each rank passes its contiguous shard of
  the sequence and gets its shard of the single-process result (DeepSpeed-Ulysses: all-to-all to head
  shards, attention over the full sequence, all-to-all back). See docs/distributed.md.
* :func:`sequence_to_heads`, :func:`qkv_to_heads`, :func:`heads_to_sequence`, :func:`gather_sequence`: the
  differentiable collectives they are built from, for plugging moga into other Ulysses wrappers (DeepSpeed,
  yunchang) or running several attention branches on one set of head shards.
"""

from moga.distributed.ulysses import (
    gather_sequence,
    heads_to_sequence,
    qkv_to_heads,
    sequence_to_heads,
    ulysses_group_attention,
    ulysses_moga_attention,
)

__all__ = [
    "gather_sequence",
    "heads_to_sequence",
    "qkv_to_heads",
    "sequence_to_heads",
    "ulysses_group_attention",
    "ulysses_moga_attention",
]
