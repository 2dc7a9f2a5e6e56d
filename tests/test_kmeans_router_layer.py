"""MoGAAttention(router="kmeans"): training-free groups from the layer's keys, gate 1, clusters re-used across calls."""

from __future__ import annotations

import pytest
import torch

import moga
from moga.kmeans import KMeansRouter
from tests.utils import rel_err


def _qkv(layer: moga.MoGAAttention, x: torch.Tensor):
    B, N, _ = x.shape
    shape = (B, N, layer.num_heads, layer.head_dim)
    q, k, v = layer.to_q(x).view(shape), layer.to_k(x).view(shape), layer.to_v(x).view(shape)
    return q, k, v


def test_layer_equals_group_attention_over_kmeans_of_keys():
    layer = moga.MoGAAttention(32, 2, 4, router="kmeans")
    assert isinstance(layer.router, KMeansRouter) and not list(layer.router.parameters())
    x = torch.randn(2, 60, 32, requires_grad=True)
    out = layer(x)
    q, k, v = _qkv(layer, x)
    labels, centroids = moga.kmeans(k.detach().flatten(2), 4, iters=20, seed=0)
    want = layer.to_out(moga.group_attention(q, k, v, labels, num_groups=4, backend="torch").reshape(2, 60, 32))
    assert rel_err(out, want.detach()) < 1e-5
    assert torch.equal(layer.router.cache.centroids, centroids)
    out.square().sum().backward()
    assert x.grad is not None and layer.to_k.weight.grad.abs().sum() > 0

    # the next call (next diffusion step) warm-starts from the kept centroids: 2 iterations
    x2 = x.detach() + 0.01 * torch.randn_like(x)
    out2 = layer(x2)
    q2, k2, v2 = _qkv(layer, x2)
    labels2, _ = moga.kmeans(k2.detach().flatten(2), 4, iters=2, seed=0, init=centroids)
    want2 = layer.to_out(moga.group_attention(q2, k2, v2, labels2, num_groups=4, backend="torch").reshape(2, 60, 32))
    assert rel_err(out2, want2.detach()) < 1e-5
    layer.router.cache.reset()
    assert layer.router.cache.centroids is None


def test_kmeans_router_logits_give_gate_one():
    router = KMeansRouter(5)
    feats = torch.randn(1, 40, 6)
    logits = router(feats)
    probs, groups, gates = moga.route_tokens(logits)
    assert torch.equal(gates, torch.ones_like(gates))
    assert torch.equal(groups[..., 0], moga.kmeans(feats, 5, iters=20)[0])


def test_kmeans_router_with_static_branches():
    layer = moga.MoGAAttention(32, 2, 3, router="kmeans", window=(1, 2, 2), frame_attention=True)
    out = layer(torch.randn(1, 2 * 4 * 4, 32), grid=(2, 4, 4))
    assert out.shape == (1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"router": "random"}, {"router": "kmeans", "top_k": 2}, {"router": "kmeans", "sequence_parallel_group": 1}],
)
def test_bad_settings(kwargs):
    with pytest.raises(ValueError):
        moga.MoGAAttention(32, 2, 4, **kwargs)


def test_default_router_is_learned():
    assert isinstance(moga.MoGAAttention(32, 2, 4).router, moga.MoGARouter)
