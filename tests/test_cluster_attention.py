"""moga.cluster_attention (top-p cluster pairs) against the dense float64 reference, on every CPU-runnable backend."""

from __future__ import annotations

import pytest
import torch

import moga
from moga.cluster import select_cluster_pairs
from moga.reference import cluster_attention_ref, cluster_pairs_ref
from tests.utils import (
    as_double_leaves,
    assert_bf16_fwd_bwd_within_twice,
    bf16_masked_attention,
    check_fwd_bwd_against_float64,
    cpu_backends,
    dense_sdpa,
    rel_err,
)

BACKENDS = cpu_backends()


def _clustered(B, N, Hq, Hkv, D, Mq, Mk, dtype=torch.float32, spread=2.0):
    """q, k, v with cluster structure (tokens of a cluster share a random mean), and the labels (B, N)."""
    ql, kl = torch.randint(0, Mq, (B, N)), torch.randint(0, Mk, (B, N))
    q = spread * torch.randn(B, Mq, Hq, D)[torch.arange(B)[:, None], ql] + torch.randn(B, N, Hq, D)
    k = spread * torch.randn(B, Mk, Hkv, D)[torch.arange(B)[:, None], kl] + torch.randn(B, N, Hkv, D)
    v = torch.randn(B, N, Hkv, D)
    return [t.to(dtype).requires_grad_(True) for t in (q, k, v)], ql, kl


def _check_fwd_bwd(backend, q, k, v, ql, kl, tol=None, **kwargs):
    """Forward and dq/dk/dv against the float64 reference, with poisoned kernel outputs."""
    top_p, min_clusters = kwargs.get("top_p", 0.9), kwargs.get("min_clusters", 1)
    return check_fwd_bwd_against_float64(
        lambda q, k, v: moga.cluster_attention(q, k, v, ql, kl, backend=backend, **kwargs),
        lambda q64, k64, v64: cluster_attention_ref(
            q64, k64, v64, ql, kl, top_p, min_clusters, kwargs.get("softmax_scale")
        ),
        q,
        k,
        v,
        tol,
    )


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.8, 0.95, 1.0])
@pytest.mark.parametrize("min_clusters", [1, 3])
def test_selection_matches_reference(top_p, min_clusters):
    (q, k, _), ql, kl = _clustered(2, 120, 4, 2, 16, 6, 8)
    ql[0, ql[0] == 2] = 5  # query cluster 2 of row 0 empty
    kl[1, kl[1] == 0] = 1  # key cluster 0 of row 1 empty
    got = select_cluster_pairs(q, k, ql, kl, 6, 8, top_p=top_p, min_clusters=min_clusters, softmax_scale=0.25)
    want = cluster_pairs_ref(q.detach(), k.detach(), ql, kl, top_p, min_clusters, softmax_scale=0.25)
    assert torch.equal(got, want)
    assert not got[0, 2].any() and not got[1, :, 0].any()
    chosen = got.sum(-1)[got.any(-1)]
    assert (chosen >= min_clusters).all()
    if top_p < 0.5:  # a structured input: a small top_p keeps few key clusters
        assert chosen.float().mean() < 4


def test_min_clusters_alone_when_top_p_is_tiny():
    (q, k, _), ql, kl = _clustered(1, 200, 2, 2, 16, 5, 9)
    for m in (1, 4, 20):
        got = select_cluster_pairs(q, k, ql, kl, 5, 9, top_p=1e-9, min_clusters=m, softmax_scale=0.25)
        assert (got.sum(-1) == min(m, 9)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,N,Hq,Hkv,D,Mq,Mk", [(1, 37, 2, 2, 32, 3, 4), (2, 100, 2, 1, 64, 5, 7), (1, 67, 4, 1, 32, 6, 3)]
)
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_against_reference(backend, B, N, Hq, Hkv, D, Mq, Mk, top_p):
    (q, k, v), ql, kl = _clustered(B, N, Hq, Hkv, D, Mq, Mk)
    _check_fwd_bwd(backend, q, k, v, ql, kl, top_p=top_p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_one_is_dense_attention(backend):
    (q, k, v), ql, kl = _clustered(2, 70, 2, 2, 64, 4, 5)
    out = _check_fwd_bwd(backend, q, k, v, ql, kl, top_p=1.0)
    assert rel_err(out, dense_sdpa(q, k, v)) < 1e-5
    q64, k64, v64 = as_double_leaves(q, k, v)
    dense = dense_sdpa(q64, k64, v64)
    torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_singleton_and_padding_clusters(backend):
    (q, k, v), ql, kl = _clustered(2, 60, 2, 1, 32, 4, 4)
    ql[0, :3] = torch.tensor([9, 10, 11])  # single-token query clusters; clusters 4-8 empty (num given)
    kl[0, :2] = torch.tensor([12, 13])  # single-token key clusters
    ql[1, :5] = -1  # padding queries: output 0, no gradient
    kl[1, 5:9] = -3  # padding keys: never attended
    out = _check_fwd_bwd(backend, q, k, v, ql, kl, top_p=0.7, num_q_clusters=14, num_k_clusters=16)
    assert (out[1, :5] == 0).all() and (q.grad[1, :5] == 0).all()
    assert (k.grad[1, 5:9] == 0).all() and (v.grad[1, 5:9] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_cluster_each_is_dense(backend):
    (q, k, v), _, _ = _clustered(1, 50, 2, 2, 32, 1, 1)
    zeros = torch.zeros(1, 50, dtype=torch.long)
    out = _check_fwd_bwd(backend, q, k, v, zeros, zeros, top_p=0.1)
    assert rel_err(out, dense_sdpa(q, k, v)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_labels(backend):
    (q, k, v), _, _ = _clustered(2, 48, 4, 2, 16, 1, 1)
    ql, kl = torch.randint(0, 4, (2, 48, 4)), torch.randint(0, 5, (2, 48, 2))
    _check_fwd_bwd(backend, q, k, v, ql, kl, top_p=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    (q, k, v), ql, kl = _clustered(1, 96, 2, 2, 64, 3, 4, dtype=torch.float16)
    _check_fwd_bwd(backend, q, k, v, ql, kl, top_p=0.8)


def test_with_kmeans_labels_and_custom_scale():
    """As a user would: cluster queries and keys with moga.kmeans (heads concatenated), then attend."""
    (q, k, v), _, _ = _clustered(2, 150, 2, 2, 16, 6, 6)
    ql, _ = moga.kmeans(q.detach().flatten(2), 6, iters=10)
    kl, _ = moga.kmeans(k.detach().flatten(2), 8, iters=10)
    out = moga.cluster_attention(q, k, v, ql, kl, top_p=0.7, softmax_scale=0.2, backend="torch")
    ref = cluster_attention_ref(q.detach(), k.detach(), v.detach(), ql, kl, 0.7, softmax_scale=0.2)
    assert rel_err(out, ref) < 1e-5
    assert rel_err(out, dense_sdpa(q, k, v)) > 1e-3  # clusters were actually dropped (scale aside)


@pytest.mark.parametrize(
    "kwargs,err",
    [
        ({"top_p": 0.0}, ValueError),
        ({"top_p": 1.5}, ValueError),
        ({"min_clusters": 0}, ValueError),
        ({"num_q_clusters": 2}, ValueError),  # labels go up to 3
        ({"num_k_clusters": 11}, ValueError),  # more clusters than tokens
        ({"k_labels": torch.full((1, 10), 10**9)}, ValueError),  # sparse ids
        ({"q_labels": torch.zeros(1, 10)}, TypeError),
        ({"q_labels": torch.zeros(1, 9, dtype=torch.long)}, ValueError),
        ({"q_labels": torch.zeros(1, 10, 2, dtype=torch.long)}, ValueError),  # per-head q, shared k
    ],
)
def test_bad_input(kwargs, err):
    q = k = v = torch.randn(1, 10, 2, 8)
    args = {"q_labels": torch.arange(10).view(1, 10) % 4, "k_labels": torch.zeros(1, 10, dtype=torch.long)}
    args.update(kwargs)
    ql, kl = args.pop("q_labels"), args.pop("k_labels")
    with pytest.raises(err):
        moga.cluster_attention(q, k, v, ql, kl, **args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_torch_bf16_error(backend):
    """Output and dq/dk/dv errors vs float64 at most twice those of the same masked attention computed in bf16."""
    (q, k, v), ql, kl = _clustered(1, 80, 2, 2, 64, 3, 4, dtype=torch.bfloat16)
    chosen = cluster_pairs_ref(q.detach().double(), k.detach().double(), ql, kl, 0.8)
    mask = chosen[0][ql[0][:, None], kl[0][None, :]].unsqueeze(0)
    assert_bf16_fwd_bwd_within_twice(
        lambda q, k, v: moga.cluster_attention(q, k, v, ql, kl, top_p=0.8, backend=backend),
        lambda q, k, v: bf16_masked_attention(q, k, v, mask[:, None]),
        lambda q64, k64, v64: cluster_attention_ref(q64, k64, v64, ql, kl, 0.8),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_flag_bitwise(backend):
    (q, k, v), ql, kl = _clustered(1, 90, 2, 1, 32, 4, 5)
    dout = torch.randn(q.shape)
    runs = []
    for _ in range(2):
        out = moga.cluster_attention(q, k, v, ql, kl, top_p=0.7, backend=backend, deterministic=True)
        runs.append([out, *torch.autograd.grad(out, (q, k, v), dout)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_centroid_sums_chunked(monkeypatch):
    """The centroid sums run over chunks of tokens (no (B, N, M) one-hot at once): same selection as the reference."""
    import moga.cluster

    monkeypatch.setattr(moga.cluster, "_CHUNK_ELEMENTS", 40)  # chunks of 40 // (2 * 6) = 3 tokens
    (q, k, _), ql, kl = _clustered(2, 100, 2, 2, 16, 6, 6)
    got = select_cluster_pairs(q, k, ql, kl, 6, 6, top_p=0.6, min_clusters=1, softmax_scale=0.25)
    assert torch.equal(got, cluster_pairs_ref(q.detach(), k.detach(), ql, kl, 0.6, softmax_scale=0.25))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "torch"])
@pytest.mark.parametrize("per_head", [False, True])
def test_cuda_against_reference(backend, per_head):
    if backend not in ("auto", *moga.available_backends()):
        pytest.skip(f"backend {backend} not available")
    (q, k, v), ql, kl = _clustered(2, 300, 4, 2, 64, 6, 7)
    if per_head:
        ql, kl = torch.randint(0, 6, (2, 300, 4)), torch.randint(0, 7, (2, 300, 2))
    q, k, v = (t.detach().cuda().requires_grad_(True) for t in (q, k, v))
    _check_fwd_bwd(backend, q, k, v, ql.cuda(), kl.cuda(), top_p=0.7)
