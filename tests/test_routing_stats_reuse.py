"""The diffusers processors route each layer's logits once: the routed branch and routing_stats (balance loss, group
fractions) share the routing. The statistics are exactly those of the former separate computation
(group_balance_loss plus a second route_tokens), and the attention output that of moga_layer_attention."""

from __future__ import annotations

import pytest
import torch

import moga.functional
import moga.integrations._block_causal
import moga.integrations._core
import moga.router
from moga.integrations._core import MoGAProcessorBase, routed_layer_attention, routing_stats
from moga.modules import moga_layer_attention
from moga.router import group_balance_loss, route_tokens

ROUTE_TOKENS = route_tokens


def former_routing_stats(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """routing_stats as it was: the balance loss of moga.group_balance_loss, the fractions from a second routing."""
    loss = group_balance_loss(logits, top_k, form="paper")
    with torch.no_grad():
        groups = ROUTE_TOKENS(logits, top_k)[1].reshape(-1)
        counts = torch.zeros(logits.shape[-1]).index_add_(0, groups, torch.ones_like(groups, dtype=torch.float32))
    return loss, counts / max(logits.shape[0] * logits.shape[1], 1)


def assert_same_stats(got, logits, top_k):
    want = former_routing_stats(logits, top_k)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if logits.requires_grad:
        g_got = torch.autograd.grad(got[0], logits, retain_graph=True)[0]
        g_want = torch.autograd.grad(want[0], logits, retain_graph=True)[0]
        assert torch.equal(g_got, g_want)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_routing_stats_equal_the_former_computation(top_k, dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 13, 4, dtype=dtype)
    logits[0, :5] = 0.5  # ties: the lower groups win
    logits.requires_grad_()
    assert_same_stats(routing_stats(logits, top_k), logits, top_k)
    assert_same_stats(routing_stats(logits, top_k, routing=route_tokens(logits, top_k)), logits, top_k)
    with pytest.raises(ValueError, match="routing must be route_tokens"):
        routing_stats(logits, top_k, routing=route_tokens(logits, 3))


@pytest.mark.parametrize("static", [False, True])
def test_routed_layer_attention_equals_moga_layer_attention(static):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, 2, 16, requires_grad=True) for _ in range(3))
    logits = torch.randn(2, 24, 3, requires_grad=True)
    kw = dict(top_k=2, grid=(4, 2, 3), backend="torch")
    if static:
        kw.update(window=(2, 1, 2), frame_attention=True, shot_starts=[2], context_frames=1)
    got = routed_layer_attention(q, k, v, route_tokens(logits, 2), **kw)
    want = moga_layer_attention(q, k, v, logits, **kw)
    assert torch.equal(got, want)
    w = torch.randn_like(got)
    for g, r in zip(torch.autograd.grad((got * w).sum(), (q, k, v, logits)),
                    torch.autograd.grad((want * w).sum(), (q, k, v, logits)), strict=True):  # fmt: skip
        assert torch.allclose(g, r, rtol=1e-6, atol=1e-7)


diffusers = pytest.importorskip("diffusers")

from moga.integrations.diffusers import apply_moga, moga_processors  # noqa: E402
from tests._diffusers_families import FAMILIES, output, skyreels_block_causal  # noqa: E402

CASES = {**FAMILIES, "SkyReelsV2 block-causal": skyreels_block_causal}


@pytest.mark.parametrize("name", list(CASES))
def test_each_layer_routes_once_and_reports_the_former_statistics(name, monkeypatch):
    torch.manual_seed(0)
    model, x = CASES[name]()
    apply_moga(model, 3, top_k=2, window=(2, 2, 2), frame_attention=True, context_frames=1)
    calls, checked, counting = [], [], [True]

    def counted_route_tokens(*args, **kwargs):
        if counting[0]:
            calls.append(1)
        return ROUTE_TOKENS(*args, **kwargs)

    for module in (moga.router, moga.functional, moga.integrations._core, moga.integrations._block_causal,
                   moga.integrations.diffusers_mmdit):  # fmt: skip
        # raising=False: a module that routes through _core has no route_tokens now, but would be counted if it did
        monkeypatch.setattr(module, "route_tokens", counted_route_tokens, raising=False)
    record = MoGAProcessorBase._record_routing

    def checked_record(self, logits, routing):
        record(self, logits, routing)
        counting[0] = False  # the former computation below routes again: not the processor's
        assert_same_stats((self.last_balance_loss, self.last_group_fraction), logits, self.top_k)
        counting[0] = True
        checked.append(1)

    monkeypatch.setattr(MoGAProcessorBase, "_record_routing", checked_record)
    output(model, x)
    n_layers = len(moga_processors(model))
    assert n_layers >= 2 and len(checked) == n_layers
    assert len(calls) == n_layers  # one routing per layer call (it was three: attention, loss, fractions)
