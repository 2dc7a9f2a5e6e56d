"""Batched k-means (Lloyd's algorithm) on the tensors' device, for training-free grouping.

``kmeans(x, M)`` clusters the N points of every batch row (and, for (B, N, H, C) input, of every head) into M
clusters. Everything runs on x's device in plain PyTorch, with a fixed number of iterations and no host
synchronisation: the loop never reads a tensor value back, so on CUDA it queues all of its work at once.

Cost per iteration: O(N * M * C) (one pass over x computing the scores x.c - |c|^2 / 2 and, through a one-hot
product, the cluster sums). Extra memory: O(N + M * C) per row (labels and nearest distances of the points,
the centroids) plus one chunk of the scores: the points are visited in chunks of rows so that no N x M matrix is
held at once (``chunk_size``).

Results are bitwise reproducible for a given seed on a given device: on CUDA the cluster sums are one-hot matrix
products (no floating-point atomics), on the CPU a sequential ``index_add``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

INIT_METHODS = ("kmeans++", "random")

# Budget, in elements, for one chunk's (rows, points, clusters) score or one-hot matrix (here and in moga.cluster).
_CHUNK_ELEMENTS = 1 << 23


def _onehot_sums(chunk: torch.Tensor, labels: torch.Tensor, M: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """chunk (B, n, C), labels (B, n) int64 in [-1, M) -> the chunk's per-cluster sums (B, M, C) and counts (B, M),
    in ``dtype``; label -1 counts nowhere. A one-hot product, not atomics: reproducible on every device."""
    onehot = (labels.unsqueeze(-1) == torch.arange(M, device=labels.device)).to(dtype)  # (B, n, M)
    return torch.bmm(onehot.transpose(1, 2), chunk.to(dtype)), onehot.sum(1)


class _Points:
    """Read access to the points of x as B' = B * H independent rows of (N, C), in the compute dtype, by chunks
    of points (only a chunk is ever converted or made contiguous)."""

    def __init__(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        self.x, self.dtype = x, dtype
        self.per_head = x.dim() == 4
        self.B = x.shape[0]
        self.H = x.shape[2] if self.per_head else 1
        self.rows = self.B * self.H
        self.N, self.C = x.shape[1], x.shape[-1]
        self.sq_norm = torch.empty(0)  # (B', N) |x|^2 of every point, filled by :meth:`compute_sq_norm`

    def compute_sq_norm(self, step: int) -> None:
        self.sq_norm = torch.cat([self.chunk(a, b).square().sum(-1) for a, b in _chunks(self.N, step)], dim=1)

    def chunk(self, a: int, b: int) -> torch.Tensor:
        """(B', b - a, C) points a..b of every row, compute dtype."""
        xs = self.x[:, a:b]
        if self.per_head:  # (B, n, H, C) -> (B * H, n, C), row b * H + h
            xs = xs.permute(0, 2, 1, 3).reshape(self.rows, b - a, self.C)
        return xs.to(self.dtype)

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B', K) point indices -> (B', K, C) those points, compute dtype."""
        if self.per_head:
            row = torch.arange(self.rows, device=idx.device).view(-1, 1)
            return self.x[row // self.H, idx, row % self.H].to(self.dtype)
        row = torch.arange(self.B, device=idx.device).view(-1, 1)
        return self.x[row, idx].to(self.dtype)


def _chunks(N: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, N)) for a in range(0, N, step)]


def _sq_dist(pts: _Points, a: int, b: int, c: torch.Tensor) -> torch.Tensor:
    """Points a..b and centroids c (B', K, C) -> (B', b - a, K) squared distances, clamped at 0."""
    d = torch.baddbmm(c.square().sum(-1).unsqueeze(1), pts.chunk(a, b), c.transpose(1, 2), alpha=-2.0)
    return d.add_(pts.sq_norm[:, a:b, None]).clamp_(min=0)


def _nearest(
    pts: _Points, a: int, b: int, c: torch.Tensor, half_sq_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of points a..b by the largest score x.c - |c|^2 / 2 (ties to the lower index).

    Returns labels (B', n) int64 and the squared distance to that centroid (B', n), clamped at 0.
    """
    scores = torch.baddbmm(half_sq_norm.neg().unsqueeze(1), pts.chunk(a, b), c.transpose(1, 2))  # (B', n, M)
    best, labels = scores.max(dim=-1)
    dist = (pts.sq_norm[:, a:b] - 2 * best).clamp_(min=0)
    return labels, dist


def _init_random(pts: _Points, M: int, gen: torch.Generator) -> torch.Tensor:
    """M distinct points of every row, uniformly at random."""
    keys = torch.rand(pts.rows, pts.N, generator=gen, device=pts.x.device)
    return pts.gather(keys.argsort(dim=1)[:, :M])


def _init_kmeanspp(pts: _Points, M: int, gen: torch.Generator, step: int) -> torch.Tensor:
    """Greedy k-means++: each new centroid is the best (lowest resulting inertia) of ``2 + floor(ln M)`` candidates
    drawn with probability proportional to the squared distance to the nearest centroid so far."""
    dev, rows, N = pts.x.device, pts.rows, pts.N
    trials = 2 + int(math.log(M))
    centroids = torch.empty(rows, M, pts.C, dtype=pts.dtype, device=dev)
    first = (torch.rand(rows, 1, generator=gen, device=dev) * N).long().clamp_(max=N - 1)
    centroids[:, :1] = pts.gather(first)
    d2 = torch.cat([_sq_dist(pts, a, b, centroids[:, :1])[..., 0] for a, b in _chunks(N, step)], dim=1)
    for m in range(1, M):
        cum = d2.cumsum(dim=1)
        u = torch.rand(rows, trials, generator=gen, device=dev, dtype=pts.dtype) * cum[:, -1:]
        cand_idx = torch.searchsorted(cum, u, right=True).clamp_(max=N - 1)  # (B', L), weight-proportional draws
        cand = pts.gather(cand_idx)  # (B', L, C)
        potential = torch.zeros(rows, trials, dtype=pts.dtype, device=dev)
        for a, b in _chunks(N, step):
            potential += torch.minimum(d2[:, a:b, None], _sq_dist(pts, a, b, cand)).sum(dim=1)
        best = potential.argmin(dim=1)
        chosen = cand[torch.arange(rows, device=dev), best].unsqueeze(1)  # (B', 1, C)
        centroids[:, m : m + 1] = chosen
        d2 = torch.cat(
            [torch.minimum(d2[:, a:b], _sq_dist(pts, a, b, chosen)[..., 0]) for a, b in _chunks(N, step)], dim=1
        )
    return centroids


def _check_args(
    x: torch.Tensor, num_clusters: int, iters: int, seed: int, init: str | torch.Tensor, chunk_size: int | None
) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() not in (3, 4):
        raise ValueError(f"x must have shape (B, N, C) or (B, N, H, C), got {tuple(x.shape)}")
    for name, val, low in (("num_clusters", num_clusters, 1), ("iters", iters, 0), ("seed", seed, None)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if low is not None and val < low:
            raise ValueError(f"{name} must be >= {low}, got {val}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if x.shape[-1] < 1:
        raise ValueError(f"x must have at least one feature (last dim), got shape {tuple(x.shape)}")
    if num_clusters > x.shape[1]:
        raise ValueError(f"num_clusters ({num_clusters}) must not exceed the number of points N ({x.shape[1]})")
    if isinstance(init, torch.Tensor):
        want = (x.shape[0], num_clusters, *x.shape[2:])
        if tuple(init.shape) != want:
            raise ValueError(f"init centroids must have shape {want}, got {tuple(init.shape)}")
        if not init.dtype.is_floating_point or init.device != x.device:
            raise ValueError(f"init centroids must be floating point on {x.device}, got {init.dtype} on {init.device}")
    elif init not in INIT_METHODS:
        raise ValueError(f"init must be one of {INIT_METHODS} or a tensor of centroids, got {init!r}")


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 20,
    seed: int = 0,
    init: str | torch.Tensor = "kmeans++",
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means: ``iters`` Lloyd iterations from a k-means++ (or random) start.

    Every batch row (and every head, for 4-D input) is clustered on its own. The distance is Euclidean; a point's
    cluster is the centroid c maximising ``x.c - |c|^2 / 2`` (the nearest centroid), ties to the lower index.

    Args:
        x: (B, N, C) points, or (B, N, H, C) to cluster each head's points separately. Any float dtype; the
            computation is in float32 (float64 for float64 x). Must be finite (checked: on the CPU before running,
            on CUDA by an asynchronous device assertion).
        num_clusters: M, in [1, N].
        iters: Lloyd iterations (assignment, then centroid update), a fixed count: there is no convergence test,
            which would need a host synchronisation. 0 returns the initial centroids.
        seed: seeds a private generator on x's device; the result is a deterministic function of (x, M, iters,
            seed, init, device).
        init: "kmeans++" (greedy k-means++: each centroid the best of ``2 + floor(ln M)`` candidates sampled in
            proportion to the squared distance to the nearest centroid so far), "random" (M distinct points
            uniformly at random), or a tensor of initial centroids shaped like the returned ones (a warm start,
            e.g. the previous diffusion step's centroids).
        chunk_size: points per chunk of the distance computation (default: about 8M scores per chunk). Only the
            memory use depends on it (and float rounding of the cluster sums).

    Empty clusters: after each assignment, a cluster with no point is re-seeded at a data point: the j-th empty
    cluster (in index order) moves to the point with the j-th largest squared distance to its assigned centroid
    (the points worst served by the current clustering). Non-empty clusters move to the mean of their points.

    Returns:
        labels: (B, N) int64 (or (B, N, H)) in [0, M): the nearest of the returned centroids for every point.
        centroids: (B, M, C) (or (B, M, H, C)), float32 (float64 for float64 x).
    """
    _check_args(x, num_clusters, iters, seed, init, chunk_size)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    finite = torch.isfinite(x).all()
    if x.device.type == "cpu":
        if not bool(finite):
            raise ValueError("x must be finite (it holds NaN or inf)")
    else:
        torch._assert_async(finite, "moga.kmeans: x must be finite")
    pts = _Points(x, dtype)
    M, N, rows, dev = num_clusters, pts.N, pts.rows, x.device
    lab_shape = (pts.B, N, pts.H) if pts.per_head else (pts.B, N)
    cen_shape = (pts.B, M, pts.H, pts.C) if pts.per_head else (pts.B, M, pts.C)
    if rows == 0:
        return torch.zeros(lab_shape, dtype=torch.int64, device=dev), torch.zeros(cen_shape, dtype=dtype, device=dev)
    trials = 2 + int(math.log(M))
    step = chunk_size or max(1, _CHUNK_ELEMENTS // (rows * max(M, trials)))

    pts.compute_sq_norm(step)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    if isinstance(init, torch.Tensor):
        c = init.detach().to(dtype)
        centroids = c.permute(0, 2, 1, 3).reshape(rows, M, pts.C) if pts.per_head else c.clone()
    elif init == "random":
        centroids = _init_random(pts, M, gen)
    else:
        centroids = _init_kmeanspp(pts, M, gen, step)

    for _ in range(iters):
        centroids = _lloyd_step(pts, centroids, step)
    labels = _assign(pts, centroids, step, lambda a, b, lab, dist: None)

    if pts.per_head:
        labels = labels.view(pts.B, pts.H, N).permute(0, 2, 1).contiguous()
        centroids = centroids.view(pts.B, pts.H, M, pts.C).permute(0, 2, 1, 3).contiguous()
    return labels, centroids


def _assign(
    pts: _Points,
    centroids: torch.Tensor,
    step: int,
    visit: Callable[[int, int, torch.Tensor, torch.Tensor], None],
) -> torch.Tensor:
    """Labels (B', N) of every point; ``visit(a, b, labels_chunk, dist_chunk)`` sees each chunk."""
    half_sq = 0.5 * centroids.square().sum(-1)
    labels = torch.empty(pts.rows, pts.N, dtype=torch.int64, device=centroids.device)
    for a, b in _chunks(pts.N, step):
        lab, dist = _nearest(pts, a, b, centroids, half_sq)
        labels[:, a:b] = lab
        visit(a, b, lab, dist)
    return labels


def _lloyd_step(pts: _Points, centroids: torch.Tensor, step: int) -> torch.Tensor:
    """One assignment + update, with the empty-cluster rule of :func:`kmeans`."""
    rows, M, dev, dtype = pts.rows, centroids.shape[1], centroids.device, centroids.dtype
    sums = torch.zeros(rows, M, pts.C, dtype=dtype, device=dev)
    counts = torch.zeros(rows, M, dtype=dtype, device=dev)
    dist = torch.empty(rows, pts.N, dtype=dtype, device=dev)

    row_base = torch.arange(rows, device=dev).view(rows, 1) * M

    def accumulate(a: int, b: int, lab: torch.Tensor, d: torch.Tensor) -> None:
        if dev.type == "cpu":  # index_add is sequential (deterministic) on the CPU and half the work of a product
            flat = (lab + row_base).view(-1)
            sums.view(rows * M, pts.C).index_add_(0, flat, pts.chunk(a, b).reshape(-1, pts.C))
            counts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=dtype))
        else:  # a one-hot product, not atomics: reproducible on CUDA
            chunk_sums, chunk_counts = _onehot_sums(pts.chunk(a, b), lab, M, dtype)
            sums.add_(chunk_sums)
            counts.add_(chunk_counts)
        dist[:, a:b] = d

    _assign(pts, centroids, step, accumulate)
    empty = counts == 0
    means = sums / counts.clamp(min=1).unsqueeze(-1)
    # At most M - 1 clusters are empty (N >= 1 points land somewhere), so the M farthest points suffice.
    far = dist.topk(M, dim=1).indices  # (B', M), farthest first
    rank = (empty.long().cumsum(dim=1) - 1).clamp_(min=0)
    reseed = pts.gather(far.gather(1, rank))  # (B', M, C)
    return torch.where(empty.unsqueeze(-1), reseed, means)


class KMeansCache:
    """k-means re-used across calls, as Sparse VideoGen2 re-uses its clustering across diffusion steps.

    The first call (or a call whose x has another shape, device or dtype than the previous one) clusters from a
    k-means++ start with ``iters_first`` iterations; every later call starts from the previous call's centroids and
    runs ``iters_warm`` iterations. One cache per layer (and per q / k when both are clustered).

    Example: ``cache = KMeansCache(16)``; every step ``labels = cache(k.flatten(2))``.
    """

    def __init__(self, num_clusters: int, *, iters_first: int = 20, iters_warm: int = 2, seed: int = 0) -> None:
        for name, val in (("iters_first", iters_first), ("iters_warm", iters_warm)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name} must be an int >= 0, got {val!r}")
        self.num_clusters, self.iters_first, self.iters_warm, self.seed = num_clusters, iters_first, iters_warm, seed
        self.centroids: torch.Tensor | None = None
        self._key: tuple | None = None

    def reset(self) -> None:
        """Forget the centroids: the next call starts cold."""
        self.centroids, self._key = None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, C) or (B, N, H, C) -> labels (B, N) or (B, N, H) int64 (see :func:`kmeans`); keeps the
        centroids (``self.centroids``) for the next call."""
        key = (tuple(x.shape), x.device, x.dtype)
        warm = self.centroids is not None and key == self._key
        if warm:
            init: str | torch.Tensor = self.centroids
            iters = self.iters_warm
        else:
            init, iters = "kmeans++", self.iters_first
        labels, self.centroids = kmeans(x, self.num_clusters, iters=iters, seed=self.seed, init=init)
        self._key = key
        return labels


class KMeansRouter(torch.nn.Module):
    """Training-free routing: groups are the k-means clusters of per-token features (e.g. a layer's keys).

    ``forward(features)``: (B, N, C) -> router logits (B, N, M) float32 that are 0 at the token's cluster and
    ``-1e4`` elsewhere, so that ``softmax`` gives the cluster a gate of exactly 1 (float32 exp(-1e4) is 0) and
    :func:`moga.moga_attention` computes plain group attention over the clusters. Clusters are re-used across calls
    through a :class:`KMeansCache` (cold start, then warm starts: the diffusion-step re-use of Sparse VideoGen2).
    No parameters: nothing to train, and the balance loss of these logits is a constant.
    """

    def __init__(self, num_groups: int, *, iters_first: int = 20, iters_warm: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.cache = KMeansCache(num_groups, iters_first=iters_first, iters_warm=iters_warm, seed=seed)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 3:
            raise ValueError(f"features must have shape (B, N, C), got {tuple(features.shape)}")
        labels = self.cache(features.detach())
        logits = torch.full((*labels.shape, self.num_groups), -1e4, dtype=torch.float32, device=features.device)
        return logits.scatter_(-1, labels.unsqueeze(-1), 0.0)

    def extra_repr(self) -> str:
        c = self.cache
        return f"num_groups={self.num_groups}, iters_first={c.iters_first}, iters_warm={c.iters_warm}, seed={c.seed}"
