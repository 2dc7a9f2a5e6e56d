"""moga: kernels for Mixture-of-Groups Attention (MoGA, arXiv 2510.18692).

Functional API (layout ``(batch, seqlen, heads, headdim)`` as in flash-attention):

* :func:`group_attention`: attention inside groups given by integer ids;
* :func:`moga_attention`: routed, gated group attention from router logits;
* :func:`group_balance_loss`, :class:`MoGARouter`, :func:`route_tokens`: the router side.
* :func:`plan`: tokens, FLOPs and attention memory of a video model with MoGA (also ``moga plan``).
"""

from moga.backends import available_backends
from moga.cluster import cluster_attention
from moga.functional import group_attention, moga_attention
from moga.kmeans import kmeans
from moga.modules import MoGAAttention, MoGAConfig, WindowSplit, paper_config
from moga.plan import plan
from moga.router import MoGARouter, group_balance_loss, route_tokens
from moga.window import window_attention

__version__ = "0.1.0"

__all__ = [
    "MoGARouter",
    "available_backends",
    "cluster_attention",
    "group_attention",
    "group_balance_loss",
    "kmeans",
    "moga_attention",
    "route_tokens",
    "window_attention",
    "MoGAAttention",
    "MoGAConfig",
    "WindowSplit",
    "paper_config",
    "plan",
]
