"""apply_moga(router="kmeans") and apply_moga(router_init=...) on tiny random diffusers transformers (CPU).

k-means mode: training-free groups from each layer's video keys, gate 1, no new parameters, clusters warm-started
across calls; router_init: learned routers whose initial argmax is the k-means assignment of the hidden states they
see on the unconverted model. Refusals leave the model untouched.
"""

from __future__ import annotations

import copy
import math
import sys
from types import SimpleNamespace

import pytest
import torch

import moga
from moga.modules import apply_rotary_interleaved
from moga.reference import moga_attention_ref
from moga.window import window_attention_ref
from tests.utils import TOL, rel_err

diffusers = pytest.importorskip("diffusers")

from moga.integrations._router_init import _sample_tokens  # noqa: E402
from moga.integrations.diffusers import (  # noqa: E402
    MoGAProcessorBase,
    apply_moga,
    moga_balance_loss,
    moga_processors,
    reset_kmeans_clusters,
)
from moga.kmeans import KMeansRouter  # noqa: E402
from tests._diffusers_families import FAMILIES, GRID, LATENT_5D, WAN_ARGS, _wan_like, output, skyreels_block_causal  # noqa: E402
from tests.test_diffusers_families import assert_unchanged, snapshot  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


_wan = _wan_like("WanTransformer3DModel")


ALL = {"WanTransformer3DModel": _wan, **FAMILIES}


def _attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "processor", None), MoGAProcessorBase)]


@pytest.mark.parametrize("name", list(ALL))
def test_kmeans_one_group_equals_stock_and_adds_no_state(name):
    torch.manual_seed(0)
    model, x = ALL[name]()
    keys = set(model.state_dict())
    with torch.no_grad():
        want = output(model, x)
        apply_moga(model, 1, router="kmeans")
        got = output(model, x)
    assert rel_err(got, want) < TOL[torch.float32]
    assert set(model.state_dict()) == keys  # nothing saved, nothing trainable added
    layers = _attention_layers(model)
    assert layers and all(isinstance(m.router, KMeansRouter) for m in layers)
    assert all(m.router.cache.centroids is not None for m in layers)  # every layer clustered


@pytest.mark.parametrize("name", list(ALL))
def test_kmeans_forward_backward_trains_the_projections(name):
    torch.manual_seed(0)
    model, x = ALL[name]()
    params = {n for n, _ in model.named_parameters()}
    apply_moga(model, 3, router="kmeans", window=(2, 2, 2), frame_attention=True)
    assert {n for n, _ in model.named_parameters()} == params
    model.train()
    out = output(model, x)
    assert torch.isfinite(out).all()
    (out.square().mean() + 0.1 * moga_balance_loss(model)).backward()
    for attn in _attention_layers(model):
        for proj in (attn.to_q, attn.to_k, attn.to_v):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    for proc in moga_processors(model):
        assert proc.router_kind == "kmeans"
        assert proc.last_group_fraction.sum().item() == pytest.approx(1.0)
        assert (proc.last_group_fraction > 0).sum() >= 2  # really several groups


def test_kmeans_under_skyreels_block_causal_mask():
    """Diffusion forcing's block-causal mask with k-means groups: one group equals the stock causal model, and M = 3
    trains the projections."""

    torch.manual_seed(0)
    model, x = skyreels_block_causal()
    with torch.no_grad():
        want = output(model, x)
        apply_moga(model, 1, router="kmeans")
        assert rel_err(output(model, x), want) < TOL[torch.float32]
    model, x = skyreels_block_causal()
    apply_moga(model, 3, router="kmeans", window=(2, 2, 2))
    out = output(model.train(), x)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(a.to_k.weight.grad.abs().sum() > 0 for a in _attention_layers(model))


def test_kmeans_processor_matches_float64_reference():
    """Wan layer in k-means mode = the float64 reference of group attention over moga.kmeans clusters of the
    layer's keys (heads concatenated, after QK norm and rotary), gate 1, plus the static branches."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**{**WAN_ARGS, "num_layers": 1}).double().eval()
    apply_moga(model, 3, router="kmeans", window=(2, 2, 2), frame_attention=True)
    lat = torch.randn(1, *LATENT_5D[1:], dtype=torch.float64)
    model(hidden_states=lat, timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, 5, 16).double())
    assert reset_kmeans_clusters(model) == 1
    attn = model.blocks[0].attn1
    N = math.prod(GRID)
    x = torch.randn(1, N, attn.to_q.in_features, dtype=torch.float64)
    cos, sin = model.rope(lat)
    got = attn(x, None, None, (cos, sin))

    q = apply_rotary_interleaved(attn.norm_q(attn.to_q(x)).unflatten(2, (2, -1)), cos, sin)
    k = apply_rotary_interleaved(attn.norm_k(attn.to_k(x)).unflatten(2, (2, -1)), cos, sin)
    v = attn.to_v(x).unflatten(2, (2, -1))
    labels, _ = moga.kmeans(k.flatten(2), 3, iters=20, seed=0)
    assert labels.unique().numel() > 1
    logits = torch.full((1, N, 3), -1e4, dtype=torch.float64).scatter_(-1, labels.unsqueeze(-1), 0.0)
    mean = (
        moga_attention_ref(q, k, v, logits)
        + window_attention_ref(q, k, v, GRID, (2, 2, 2))
        + window_attention_ref(q, k, v, GRID, (1, 4, 4))
    ) / 3
    want = attn.to_out[0](mean.flatten(2))
    assert rel_err(got, want) < 1e-10


def test_kmeans_clusters_are_warm_started_across_calls(monkeypatch):
    kmeans_module = sys.modules["moga.kmeans"]
    real, calls = kmeans_module.kmeans, []

    def spy(x, num_clusters, **kw):
        labels, centroids = real(x, num_clusters, **kw)
        calls.append(dict(shape=tuple(x.shape), iters=kw["iters"], init=kw["init"], centroids=centroids))
        return labels, centroids

    monkeypatch.setattr(kmeans_module, "kmeans", spy)
    torch.manual_seed(0)
    model, x = _wan()
    apply_moga(model, 3, router="kmeans", kmeans_iters=(7, 1))
    with torch.no_grad():
        first = output(model, x)
        x["hidden_states"] = torch.randn(LATENT_5D)  # the next diffusion step
        second = output(model, x)
    assert second.shape == first.shape and torch.isfinite(second).all()
    assert len(calls) == 4  # two layers, two calls
    for layer in range(2):
        cold, warm = calls[layer], calls[2 + layer]
        assert cold["shape"] == (2, 48, 64) and cold["iters"] == 7 and cold["init"] == "kmeans++"
        assert warm["iters"] == 1 and torch.equal(warm["init"], cold["centroids"])
    assert reset_kmeans_clusters(model) == 2
    with torch.no_grad():
        output(model, x)
    assert [c["iters"] for c in calls[4:]] == [7, 7]


@pytest.mark.parametrize("name", ["HunyuanVideoTransformer3DModel", "CogVideoXTransformer3DModel"])
def test_kmeans_of_joint_families_clusters_video_keys_only(name, monkeypatch):
    """The first layer's video keys do not depend on the text input (its text keys do): what k-means sees must
    not change with the text (both token orders)."""
    kmeans_module = sys.modules["moga.kmeans"]
    real, seen = kmeans_module.kmeans, []
    monkeypatch.setattr(kmeans_module, "kmeans", lambda x, m, **kw: (seen.append(x.clone()), real(x, m, **kw))[1])
    torch.manual_seed(0)
    model, x = FAMILIES[name]()
    apply_moga(model, 3, router="kmeans")
    with torch.no_grad():
        output(model, x)
        reset_kmeans_clusters(model)
        x["encoder_hidden_states"] = torch.randn_like(x["encoder_hidden_states"])
        output(model, x)
    n = len(seen) // 2
    assert seen[0].shape == (2, 48, 64)
    assert torch.equal(seen[0], seen[n])  # first layer, both calls


def _calibration(batches):
    return lambda m: [output(m, b) for b in batches]


def test_refusals_leave_the_model_untouched():
    torch.manual_seed(0)
    model, x = _wan()

    def fails(m):
        output(m, x)
        raise RuntimeError("calibration failed")

    cases = [
        (dict(router="kmeans", top_k=2), ValueError, "top_k=1"),
        (dict(router="kmeans", router_init=_calibration([x])), ValueError, "router_init"),
        (dict(router="hashing"), ValueError, "router must be"),
        (dict(router="kmeans", kmeans_iters=(20, -1)), ValueError, "iters_warm"),
        (dict(router="kmeans", kmeans_iters=20), ValueError, "kmeans_iters"),
        (dict(router_init=[x]), TypeError, "callable"),
        (dict(router_init=_calibration([x]), router_init_tokens=0), ValueError, "router_init_tokens"),
        (dict(router_init=fails), RuntimeError, "calibration failed"),
        (dict(router_init=lambda m: None), ValueError, "no forward"),
        (dict(router_init=_calibration([x]), router_init_tokens=1), ValueError, "num_clusters"),
    ]
    hooks = [len(m._forward_pre_hooks) for m in model.modules()]
    for kwargs, error, match in cases:
        before = snapshot(model)
        with pytest.raises(error, match=match):
            apply_moga(model, 3, **kwargs)
        assert_unchanged(model, before)
        assert [len(m._forward_pre_hooks) for m in model.modules()] == hooks  # calibration hooks removed
    model._parallel_config = object()  # what enable_parallelism records on the model (Wan supports it)
    for kwargs, match in [(dict(router="kmeans"), "kmeans"), (dict(router_init=_calibration([x])), "router_init")]:
        before = snapshot(model)
        with pytest.raises(NotImplementedError, match=match):
            apply_moga(model, 3, **kwargs)
        assert_unchanged(model, before)


def test_kmeans_refuses_context_parallelism_enabled_after_apply():
    model, x = _wan()
    apply_moga(model, 2, router="kmeans")
    cp = SimpleNamespace(ulysses_degree=2, ring_degree=1, ulysses_anything=False, _ulysses_mesh=None)
    for proc in moga_processors(model):
        proc._parallel_config = SimpleNamespace(context_parallel_config=cp)
    with pytest.raises(NotImplementedError, match="router='kmeans'"):
        output(model, x)


def _record_router_inputs(model, names, calibrate) -> list[torch.Tensor]:
    """The hidden states the attention layers ``names`` receive (what their processors, hence their routers,
    see), recorded on the stock model independently of apply_moga."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(mod, args, kwargs, name=name):
            seen[name].append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
    with torch.no_grad():
        calibrate(model)
    for h in handles:
        h.remove()
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[name]]) for name in names]


@pytest.mark.parametrize("name", ["WanTransformer3DModel", "HunyuanVideoTransformer3DModel"])
def test_router_init_argmax_is_the_kmeans_assignment_and_trains(name):
    torch.manual_seed(0)
    model, x = ALL[name]()
    x2 = dict(x, hidden_states=torch.randn_like(x["hidden_states"]))
    calibrate = _calibration([x, x2])
    stock = copy.deepcopy(model)
    apply_moga(model, 3, router_init=calibrate)
    names = [n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), MoGAProcessorBase)]
    inputs = _record_router_inputs(stock, names, calibrate)
    layers = _attention_layers(model)
    assert len(layers) == len(inputs) == 2
    for attn, h in zip(layers, inputs, strict=True):
        assert h.shape[0] == 2 * 2 * 48  # two calls, two batch rows, 48 video tokens
        labels = moga.kmeans(h.reshape(1, -1, h.shape[-1]), 3, iters=20, seed=0)[0][0]
        assert labels.unique().numel() == 3
        with torch.no_grad():
            assert torch.equal(attn.router(h).argmax(-1), labels)
    model.train()
    out = output(model, x)
    (out.square().mean() + 0.1 * moga_balance_loss(model)).backward()
    router_params = [(n, p) for n, p in model.named_parameters() if ".router." in n]
    assert len(router_params) == 4  # weight and bias of both layers
    for n, p in router_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_sample_tokens_caps_each_call():
    x = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    assert torch.equal(_sample_tokens(x, 20, seed=0), x.view(20, 3))
    kept = _sample_tokens(x, 7, seed=0)
    assert kept.shape == (7, 3) and torch.equal(kept, _sample_tokens(x, 7, seed=0))
    rows = kept[:, 0] / 3  # token index of each kept row, distinct and in order
    assert torch.equal(rows, rows.unique()) and torch.equal(kept, x.view(20, 3)[rows.long()])
