"""moga.kmeans: quality against scikit-learn, the empty-cluster rule, determinism, shapes, dtypes and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import moga


def _inertia(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum of squared distances of the points of (1, N, C) x to their assigned centroids, in float64."""
    return float(((x[0].double() - centroids[0].double()[labels[0]]) ** 2).sum())


def _nearest_ref(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, N, C), (B, M, C) -> (B, N) index of the nearest centroid in float64 (cdist, no shared code)."""
    return torch.cdist(x.double(), centroids.double()).argmin(-1)


@pytest.mark.parametrize(
    "n_samples,n_blobs,M,features",
    [(2000, 8, 8, 16), (3000, 10, 20, 8)],
)
def test_inertia_within_2_percent_of_sklearn(n_samples, n_blobs, M, features):
    """Best of 3 seeds (ours, k-means++) against scikit-learn's KMeans with n_init=3 (k-means++ too), on
    make_blobs data; M = number of blobs, and M = 2x blobs (many local minima)."""
    datasets = pytest.importorskip("sklearn.datasets")
    cluster = pytest.importorskip("sklearn.cluster")
    X, _ = datasets.make_blobs(
        n_samples=n_samples, centers=n_blobs, n_features=features, cluster_std=2.0, random_state=0
    )
    x = torch.tensor(X, dtype=torch.float32).unsqueeze(0)
    ours = min(_inertia(x, *moga.kmeans(x, M, iters=50, seed=s)) for s in range(3))
    theirs = cluster.KMeans(n_clusters=M, n_init=3, init="k-means++", random_state=0).fit(X).inertia_
    assert ours <= 1.02 * theirs, (ours, theirs)


def test_labels_are_nearest_centroid_and_centroids_are_means():
    datasets = pytest.importorskip("sklearn.datasets")
    X, _ = datasets.make_blobs(n_samples=600, centers=5, n_features=4, random_state=1)
    x = torch.tensor(X, dtype=torch.float32).view(2, 300, 4)
    labels, centroids = moga.kmeans(x, 5, iters=30)
    assert torch.equal(labels, _nearest_ref(x, centroids))
    for b in range(2):  # converged: every centroid is the mean of its points
        for m in range(5):
            members = x[b][labels[b] == m]
            assert members.shape[0] > 0
            torch.testing.assert_close(centroids[b, m], members.mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_deterministic_for_a_seed(init):
    x = torch.randn(3, 500, 8)
    a = moga.kmeans(x, 12, iters=5, seed=7, init=init)
    b = moga.kmeans(x, 12, iters=5, seed=7, init=init)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = moga.kmeans(x, 12, iters=0, seed=8, init=init)
    d = moga.kmeans(x, 12, iters=0, seed=7, init=init)
    assert not torch.equal(c[1], d[1])  # the seed matters


def test_chunking_changes_nothing_but_memory():
    x = torch.randn(2, 301, 6)
    la, ca = moga.kmeans(x, 9, iters=8, seed=3)
    lb, cb = moga.kmeans(x, 9, iters=8, seed=3, chunk_size=17)
    assert torch.equal(la, lb)
    torch.testing.assert_close(ca, cb, rtol=1e-5, atol=1e-5)


def test_per_head_equals_heads_as_batch_rows():
    x = torch.randn(2, 200, 3, 5)
    labels, centroids = moga.kmeans(x, 6, iters=4, seed=1)
    assert labels.shape == (2, 200, 3) and centroids.shape == (2, 6, 3, 5)
    flat = x.permute(0, 2, 1, 3).reshape(6, 200, 5)
    lf, cf = moga.kmeans(flat, 6, iters=4, seed=1)
    assert torch.equal(labels, lf.view(2, 3, 200).permute(0, 2, 1))
    assert torch.equal(centroids, cf.view(2, 3, 6, 5).permute(0, 2, 1, 3))


def test_empty_clusters_reseeded_at_farthest_points():
    """Documented rule: the j-th empty cluster moves to the point with the j-th largest distance to its centroid."""
    x = torch.randn(1, 50, 3)
    x[0, 10] = torch.tensor([9.0, 0.0, 0.0])  # the farthest point from the origin
    x[0, 20] = torch.tensor([0.0, -7.0, 0.0])  # the second farthest
    init = torch.tensor([[[0.0, 0.0, 0.0], [1e3, 1e3, 1e3], [-1e3, 1e3, 1e3], [1e3, -1e3, 1e3]]])
    # one step: every point goes to cluster 0, clusters 1-3 are empty and re-seeded
    _, centroids = moga.kmeans(x, 4, iters=1, init=init)
    dist = (x[0] - init[0, 0]).square().sum(-1)
    order = dist.argsort(descending=True)
    assert order[0] == 10 and order[1] == 20
    torch.testing.assert_close(centroids[0, 0], x[0].mean(0))
    for j in range(3):
        assert torch.equal(centroids[0, 1 + j], x[0, order[j]])


def test_identical_points_and_more_clusters_than_distinct_points():
    x = torch.ones(1, 20, 4)
    labels, centroids = moga.kmeans(x, 3, iters=5)
    assert torch.isfinite(centroids).all()
    assert (labels == 0).all()  # all centroids coincide: ties go to the lower index


def test_one_cluster_and_one_per_point():
    x = torch.randn(2, 30, 4)
    labels, centroids = moga.kmeans(x, 1, iters=3)
    assert (labels == 0).all()
    torch.testing.assert_close(centroids[:, 0], x.mean(1))
    labels, centroids = moga.kmeans(x, 30, iters=3)
    for b in range(2):  # every point its own cluster (k-means++ never draws a point twice while d2 > 0)
        assert labels[b].unique().numel() == 30
        torch.testing.assert_close(centroids[b][labels[b]], x[b])


def test_warm_start_from_centroids():
    x = torch.randn(1, 400, 4)
    _, c = moga.kmeans(x, 7, iters=10, seed=2)
    labels, c0 = moga.kmeans(x, 7, iters=0, init=c)
    assert torch.equal(c0, c) and torch.equal(labels, _nearest_ref(x, c))
    per_head = torch.randn(2, 100, 3, 4)
    _, ch = moga.kmeans(per_head, 5, iters=3)
    _, ch0 = moga.kmeans(per_head, 5, iters=0, init=ch)
    assert torch.equal(ch0, ch)


@pytest.mark.parametrize(
    "dtype,out_dtype",
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
)
def test_dtypes(dtype, out_dtype):
    x = torch.randn(1, 100, 8).to(dtype)
    labels, centroids = moga.kmeans(x, 4, iters=3)
    assert labels.dtype == torch.int64 and centroids.dtype == out_dtype
    assert torch.equal(labels, _nearest_ref(x.to(out_dtype), centroids))


def test_empty_batch():
    labels, centroids = moga.kmeans(torch.randn(0, 10, 3), 4)
    assert labels.shape == (0, 10) and centroids.shape == (0, 4, 3)


@pytest.mark.parametrize(
    "args,kwargs,err",
    [
        (([1.0, 2.0], 2), {}, TypeError),
        ((torch.ones(1, 5, 2, dtype=torch.int64), 2), {}, TypeError),
        ((torch.ones(5, 2), 2), {}, ValueError),
        ((torch.ones(1, 5, 2), 6), {}, ValueError),
        ((torch.ones(1, 5, 2), 0), {}, ValueError),
        ((torch.ones(1, 5, 2), True), {}, TypeError),
        ((torch.ones(1, 5, 2), 2.0), {}, TypeError),
        ((torch.ones(1, 5, 2), 2), {"iters": -1}, ValueError),
        ((torch.ones(1, 5, 2), 2), {"init": "kmeans"}, ValueError),
        ((torch.ones(1, 5, 2), 2), {"init": torch.ones(1, 3, 2)}, ValueError),
        ((torch.ones(1, 5, 2), 2), {"chunk_size": 0}, ValueError),
        ((torch.full((1, 5, 2), float("nan")), 2), {}, ValueError),
        ((torch.ones(1, 5, 0), 2), {}, ValueError),
    ],
)
def test_bad_input(args, kwargs, err):
    with pytest.raises(err):
        moga.kmeans(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync_and_deterministic():
    x = torch.randn(2, 5000, 4, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = moga.kmeans(x, 50, iters=5, seed=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    b = moga.kmeans(x, 50, iters=5, seed=0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    labels, centroids = a
    ref = torch.cdist(x.permute(0, 2, 1, 3).double(), centroids.permute(0, 2, 1, 3).double()).argmin(-1)
    assert (labels.permute(0, 2, 1) == ref).float().mean() > 0.999  # float32 vs float64 near-ties aside


@pytest.mark.parametrize("shape,M", [((4, 700, 48), 5), ((2, 3, 300, 32), 12), ((900, 16), 20)])
def test_router_from_kmeans_argmax_equals_labels(shape, M):
    x = torch.randn(shape)
    x[..., :4] += 3 * torch.randint(0, 3, (*shape[:-1], 1))  # some structure, not only noise
    router = moga.MoGARouter.from_kmeans(x, M, seed=5)
    labels, centroids = moga.kmeans(x.reshape(1, -1, shape[-1]), M, seed=5)
    with torch.no_grad():
        logits = router(x)
    assert logits.shape == (*shape[:-1], M)
    assert torch.equal(logits.argmax(-1).reshape(1, -1), labels)
    # auto temperature: the median best-minus-second logit gap is 2, up to the power-of-two rounding
    top2 = logits.topk(2, dim=-1).values
    gap = float((top2[..., 0] - top2[..., 1]).median())
    assert 2 / 2**0.5 - 1e-4 <= gap <= 2 * 2**0.5 + 1e-4, gap
    # logits are the scaled scores x.c - |c|^2 / 2 of the nearest-centroid rule
    c = centroids[0]
    scores = x.reshape(-1, shape[-1]).double() @ c.double().t() - 0.5 * c.double().square().sum(-1)
    tau = float(c.norm() / router.proj.weight.detach().norm())
    assert abs(math.log2(tau) - round(math.log2(tau))) < 1e-6  # a power of two
    scale = float(scores.abs().max())
    torch.testing.assert_close(logits.reshape(-1, M).double() * tau, scores, rtol=0, atol=1e-5 * scale)


def test_router_from_kmeans_explicit_temperature_and_training():
    x = torch.randn(2, 200, 16)
    r1 = moga.MoGARouter.from_kmeans(x, 4, temperature=1.0)
    r4 = moga.MoGARouter.from_kmeans(x, 4, temperature=4.0)
    assert r1.proj.bias is not None
    torch.testing.assert_close(r4(x), r1(x) / 4)
    # a warm start, trainable like any router: moga_attention's gate reaches its weights
    q = k = v = torch.randn(2, 200, 2, 8)
    moga.moga_attention(q, k, v, r4(x), backend="torch").square().sum().backward()
    assert r4.proj.weight.grad is not None and r4.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "args,kwargs",
    [((torch.randn(16), 2), {}), ((torch.randn(3, 4), 4), {}), ((torch.randn(10, 4), 2), {"temperature": 0.0})],
)
def test_router_from_kmeans_bad_input(args, kwargs):
    with pytest.raises(ValueError):
        moga.MoGARouter.from_kmeans(*args, **kwargs)


def test_kmeans_cache_warm_starts_across_calls():
    """First call cold (k-means++, iters_first); later calls start from the kept centroids (iters_warm)."""
    from moga.kmeans import KMeansCache

    x = torch.randn(2, 300, 8)
    cache = KMeansCache(6, iters_first=5, iters_warm=2, seed=3)
    labels = cache(x)
    cold_labels, cold_c = moga.kmeans(x, 6, iters=5, seed=3)
    assert torch.equal(labels, cold_labels) and torch.equal(cache.centroids, cold_c)
    x2 = x + 0.05 * torch.randn_like(x)  # the next diffusion step: slightly changed activations
    labels2 = cache(x2)
    warm_labels, warm_c = moga.kmeans(x2, 6, iters=2, seed=3, init=cold_c)
    assert torch.equal(labels2, warm_labels) and torch.equal(cache.centroids, warm_c)
    assert (labels2 == labels).float().mean() > 0.8  # the clustering is carried over
    cache(torch.randn(1, 300, 8))  # another shape: cold again
    assert cache.centroids.shape == (1, 6, 8)
    cache.reset()
    assert cache.centroids is None
    with pytest.raises(ValueError):
        KMeansCache(4, iters_warm=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_router_from_kmeans_argmax():
    x = torch.randn(2, 4000, 64, device="cuda")
    router = moga.MoGARouter.from_kmeans(x, 16)
    labels, _ = moga.kmeans(x.reshape(1, -1, 64), 16)
    with torch.no_grad():
        mismatch = router(x).argmax(-1).reshape(1, -1) != labels
    assert mismatch.float().mean() < 1e-3  # exact on the CPU; CUDA GEMMs may round an exact near-tie differently
