"""FLOP counts of attention, on the work each method actually does.

Forward attention over a group of n tokens costs 2*n*n*D (q k^T) + 2*n*n*D (p v) = 4 n^2 D per head. The
backward pass recomputes q k^T and adds dv, dp, dq and dk: 2.5x the forward (the FlashAttention convention).
"""

from __future__ import annotations

BACKWARD_FACTOR = 2.5


def group_attention_flops(sizes: list[int], head_dim: int, heads: int, backward: bool = False) -> int:
    """4 * sum_g n_g^2 * D * Hq for the forward; times (1 + 2.5) with the backward included."""
    forward = 4 * sum(n * n for n in sizes) * head_dim * heads
    return int(forward * (1 + BACKWARD_FACTOR)) if backward else forward


def dense_attention_flops(n: int, head_dim: int, heads: int, backward: bool = False) -> int:
    """Dense attention over n tokens: one group holding all of them."""
    return group_attention_flops([n], head_dim, heads, backward)
