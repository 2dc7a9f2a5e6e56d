"""Top-p cluster attention: training-free sparse attention between query and key clusters (Sparse VideoGen2 style).

Queries and keys are grouped into clusters (e.g. by :func:`moga.kmeans`). Each query cluster attends to all
tokens of the key clusters that, by an estimate from the cluster centroids, hold the top-p of its softmax mass.
It runs on the segment primitive (:mod:`moga.layout`) as ONE segment per (batch row, query cluster) whose keys
are the concatenated tokens of its chosen key clusters (a key token appears in the segments of every query
cluster that chose its cluster), so every backend runs it forward and backward and no log-sum-exp merge is needed:
the result is exact attention over the chosen keys.

Mass estimate (per batch row b, query head h, query cluster a, key cluster c), with mean query
``qbar[a] = mean of q[i, h] over tokens i of cluster a``, mean key ``kbar[c] = mean of k[j, h_kv] over tokens j of
c`` (h_kv the kv head of h) and ``n[c]`` the number of tokens of c::

    w_h[a, c] = n[c] * exp(s[a, c]) / (sum over non-empty c' of n[c'] * exp(s[a, c'])),
    s[a, c] = scale * qbar[a] . kbar[c]

that is, every key of cluster c is taken to score like the centroid pair. With labels shared by heads the
selection must be shared too, so ``w[a, c]`` is the mean of ``w_h[a, c]`` over the query heads; with per-head
labels it is ``w_h`` itself. Key clusters are ranked by w, descending (ties to the lower index), among the
non-empty ones; cluster c is chosen when the mass of the clusters ranked before it is below ``top_p``, or when
it is among the first ``min_clusters``. So the chosen clusters are the shortest prefix of the ranking whose
estimated mass reaches top_p (at least min_clusters of them). ``top_p = 1`` chooses every non-empty key cluster
(dense attention over the labelled tokens), whatever the rounding of the masses.
"""

from __future__ import annotations

import math

import torch

from moga._checks import check_qkv, softmax_scale_or_default
from moga.functional import _run_segments
from moga.kmeans import _CHUNK_ELEMENTS, _onehot_sums
from moga.layout import RoutedLayout, SegmentLayout, inverse_permutation, row_group_keys, sort_by_segment


def _check_labels(name: str, labels: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but q is on {device}")


def _num_clusters(name: str, labels: torch.Tensor, given: int | None) -> int:
    """The cluster count: ``given`` (labels checked to lie below it) or max label + 1 (one host read)."""
    if given is None:
        return max(int(labels.max()) + 1, 1) if labels.numel() else 1
    if isinstance(given, bool) or not isinstance(given, int) or given < 1:
        raise ValueError(f"num_{name}_clusters must be a positive int or None, got {given!r}")
    in_range = (labels < given).all()
    if labels.device.type == "cpu":
        if not bool(in_range):
            raise ValueError(f"{name}_labels must be < num_{name}_clusters={given}")
    else:
        torch._assert_async(in_range, f"moga: {name}_labels must be < num_{name}_clusters")
    return given


def _cluster_means(x: torch.Tensor, labels: torch.Tensor, M: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """x (B, N, H, D), labels (B, N) -> means (B, M, H, D) (0 for empty clusters) and counts (B, M).

    A one-hot product (no atomics): reproducible on every device."""
    B, N, H, D = x.shape
    sums = torch.zeros(B, M, H * D, dtype=dtype, device=x.device)
    counts = torch.zeros(B, M, dtype=dtype, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * M))  # no (B, N, M) one-hot at once
    for a in range(0, N, step):
        chunk_sums, chunk_counts = _onehot_sums(
            x[:, a : a + step].detach().reshape(B, -1, H * D), labels[:, a : a + step], M, dtype
        )
        sums += chunk_sums
        counts += chunk_counts
    return (sums / counts.clamp(min=1).unsqueeze(-1)).view(B, M, H, D), counts


def select_cluster_pairs(
    q: torch.Tensor,
    k: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    num_q_clusters: int,
    num_k_clusters: int,
    *,
    top_p: float,
    min_clusters: int,
    softmax_scale: float,
) -> torch.Tensor:
    """The (query cluster, key cluster) pairs :func:`cluster_attention` computes (see the module docstring).

    Args:
        q: (B, N, Hq, D); k: (B, N, Hkv, D). q_labels, k_labels: (B, N) int64 in [-1, M) (-1: no cluster).
    Returns: (B, Mq, Mk) bool; rows of empty query clusters are all False. Computed in float32 (float64 for
    float64 inputs); never synchronises with the GPU.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    Hq, Hkv = q.shape[2], k.shape[2]
    qbar, q_count = _cluster_means(q, q_labels, num_q_clusters, dtype)
    kbar, k_count = _cluster_means(k, k_labels, num_k_clusters, dtype)
    kbar = kbar.repeat_interleave(Hq // Hkv, dim=2)
    scores = torch.einsum("bahd,bchd->bhac", qbar, kbar) * softmax_scale  # (B, Hq, Mq, Mk)
    nonempty = k_count > 0  # (B, Mk)
    log_n = torch.where(nonempty, k_count.clamp(min=1).log(), torch.full_like(k_count, -math.inf))
    mass = torch.softmax(scores + log_n[:, None, None, :], dim=-1).nan_to_num_(0.0).mean(1)  # (B, Mq, Mk)
    if top_p >= 1:
        chosen = nonempty.unsqueeze(1).expand_as(mass)
    else:
        ranked, order = torch.sort(torch.where(nonempty.unsqueeze(1), mass, -1.0), dim=-1, descending=True, stable=True)
        valid = ranked >= 0  # empty clusters (ranked last) are never chosen
        ranked = ranked.clamp(min=0)
        before = torch.cat([torch.zeros_like(ranked[..., :1]), torch.cumsum(ranked, dim=-1)[..., :-1]], dim=-1)
        rank = torch.arange(num_k_clusters, device=q.device)
        keep = ((before < top_p) | (rank < min_clusters)) & valid
        chosen = torch.zeros_like(keep).scatter_(-1, order, keep)
    return chosen & (q_count > 0).unsqueeze(-1)


def cluster_layout(q_labels: torch.Tensor, k_labels: torch.Tensor, chosen: torch.Tensor) -> RoutedLayout:
    """The segment layout of chosen cluster pairs: one segment per (batch row, query cluster).

    Args:
        q_labels, k_labels: (B, N) int64 in [-1, M) (-1: the token is not a query / not a key).
        chosen: (B, Mq, Mk) bool.
    Returns: the layout (queries of segment (b, a) are the tokens of query cluster a, in token order; its keys the
    tokens of the chosen key clusters, by cluster then token order). Reads the total key count back to the host
    (one synchronisation).
    """
    B, N = q_labels.shape
    Mq, Mk = chosen.shape[1], chosen.shape[2]
    dev = q_labels.device
    q_order, q_offsets = sort_by_segment(row_group_keys(q_labels, Mq), B * Mq)
    k_order, k_cluster_offsets = sort_by_segment(row_group_keys(k_labels, Mk), B * Mk)
    k_size = (k_cluster_offsets[1:] - k_cluster_offsets[:-1]).view(B, 1, Mk)
    pair_len = (chosen * k_size).reshape(-1)  # (B * Mq * Mk,) keys of each (b, a, c) pair
    k_offsets = torch.zeros(B * Mq + 1, dtype=torch.int64, device=dev)
    torch.cumsum(pair_len.view(B * Mq, Mk).sum(1), 0, out=k_offsets[1:])
    total = int(k_offsets[-1])  # the one host synchronisation: the length of the key index
    pair = torch.repeat_interleave(torch.arange(pair_len.numel(), device=dev), pair_len, output_size=total)
    pair_start = torch.cumsum(pair_len, 0) - pair_len
    within = torch.arange(total, device=dev) - pair_start[pair]
    cluster_row = torch.div(pair, Mq * Mk, rounding_mode="floor") * Mk + pair % Mk  # b * Mk + c
    k_index = k_order[k_cluster_offsets[cluster_row] + within]
    segments = SegmentLayout(
        q_index=q_order,
        q_offsets=q_offsets,
        k_index=k_index,
        k_offsets=k_offsets,
        num_tokens=B * N,
        q_unique=True,
        k_unique=False,
    )
    return RoutedLayout(segments=segments, position=inverse_permutation(q_order), top_k=1)


def _check_top_p(top_p: float, min_clusters: int) -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if isinstance(min_clusters, bool) or not isinstance(min_clusters, int) or min_clusters < 1:
        raise ValueError(f"min_clusters must be an int >= 1, got {min_clusters!r}")
    return float(top_p)


def cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    *,
    top_p: float = 0.9,
    min_clusters: int = 1,
    softmax_scale: float | None = None,
    backend: str = "auto",
    num_q_clusters: int | None = None,
    num_k_clusters: int | None = None,
    deterministic: bool = False,
) -> torch.Tensor:
    """Attention between query clusters and the key clusters holding the top-p of their estimated softmax mass.

    Query token i (cluster a = q_labels[i]) attends to exactly the key tokens j whose cluster
    c = k_labels[j] is chosen for a; the choice is estimated from cluster centroids and sizes (see
    :mod:`moga.cluster` for the exact rule). ``top_p=1`` is attention over all labelled keys (dense attention
    when no label is negative).

    Args:
        q: (B, N, Hq, D); k, v: (B, N, Hkv, D), Hq a multiple of Hkv.
        q_labels, k_labels: integer cluster ids, e.g. from :func:`moga.kmeans`; negative = no cluster (the query's
            output is 0 / the key is never attended). Either (B, N) each, shared by all heads, or per head:
            q_labels (B, N, Hq) and k_labels (B, N, Hkv) (heads are then folded into the batch: q, k and v are
            copied once, k and v expanded to Hq heads).
        top_p: in (0, 1], the estimated softmax mass each query cluster keeps.
        min_clusters: every query cluster attends to at least this many (non-empty) key clusters.
        softmax_scale: defaults to D ** -0.5.
        backend, deterministic: see :func:`moga.group_attention`.
        num_q_clusters, num_k_clusters: cluster counts, at most N; default max label + 1 (one host read each).

    Returns: (B, N, Hq, D), dtype of q; differentiable in q, k and v (the choice of clusters is not).
    Synchronises with the GPU once (the number of chosen keys sizes the key index).
    """
    B, N, Hq, Hkv, D = check_qkv(q, k, v)
    top_p = _check_top_p(top_p, min_clusters)
    scale = softmax_scale_or_default(softmax_scale, D)
    per_head = isinstance(q_labels, torch.Tensor) and q_labels.dim() == 3
    _check_labels("q_labels", q_labels, (B, N, Hq) if per_head else (B, N), q.device)
    _check_labels("k_labels", k_labels, (B, N, Hkv) if per_head else (B, N), q.device)
    Mq = _num_clusters("q", q_labels, num_q_clusters)
    Mk = _num_clusters("k", k_labels, num_k_clusters)
    if max(Mq, Mk) > max(N, 1):  # the centroid work is O(N * M): cluster ids must be dense
        raise ValueError(f"cluster counts ({Mq}, {Mk}) must not exceed N={N}: use dense ids in [0, N)")
    ql = torch.where(q_labels < 0, -1, q_labels.long())
    kl = torch.where(k_labels < 0, -1, k_labels.long())
    if per_head:  # heads become batch rows (b, h) -> b * Hq + h, each with one head
        g = Hq // Hkv
        fold = lambda t: t.permute(0, 2, 1, 3).reshape(B * Hq, N, 1, D)  # noqa: E731
        q1, k1, v1 = fold(q), fold(k.repeat_interleave(g, dim=2)), fold(v.repeat_interleave(g, dim=2))
        ql = ql.permute(0, 2, 1).reshape(B * Hq, N)
        kl = kl.repeat_interleave(g, dim=2).permute(0, 2, 1).reshape(B * Hq, N)
        out = _cluster_attention(q1, k1, v1, ql, kl, Mq, Mk, top_p, min_clusters, scale, backend, deterministic)
        return out.view(B, Hq, N, D).permute(0, 2, 1, 3)
    return _cluster_attention(q, k, v, ql, kl, Mq, Mk, top_p, min_clusters, scale, backend, deterministic)


def _cluster_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    Mq: int,
    Mk: int,
    top_p: float,
    min_clusters: int,
    scale: float,
    backend: str,
    deterministic: bool,
) -> torch.Tensor:
    chosen = select_cluster_pairs(
        q, k, q_labels, k_labels, Mq, Mk, top_p=top_p, min_clusters=min_clusters, softmax_scale=scale
    )
    layout = cluster_layout(q_labels, k_labels, chosen)
    return _run_segments(q, k, v, layout, scale, backend, deterministic)[:, 0].view(q.shape)
