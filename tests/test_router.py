"""Router, top-k routing and the group balance loss, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

import moga
from moga.layout import routed_layout, sort_by_segment


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_balance_loss_paper_and_switch_by_hand():
    # p per token, M = 2; top-1 groups: 0, 0, 1, 0 -> F = (3/4, 1/4)
    logits = _logits([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    # paper: P = ((.9 + .8 + .6) / 4, .7 / 4) = (.575, .175); L = 2 (.75 * .575 + .25 * .175) = 0.95
    assert moga.group_balance_loss(logits, form="paper").item() == pytest.approx(0.95, abs=1e-12)
    # switch: P = (2.6 / 4, 1.4 / 4) = (.65, .35); L = 2 (.75 * .65 + .25 * .35) = 1.15
    assert moga.group_balance_loss(logits, form="switch").item() == pytest.approx(1.15, abs=1e-12)


def test_balance_loss_top2_and_batch_by_hand():
    # M = 3, top-2, two batch rows of one token each (N counts the tokens of the whole batch: 2)
    logits = _logits([[[0.5, 0.3, 0.2]], [[0.1, 0.6, 0.3]]])
    # groups: token0 {0, 1}, token1 {1, 2}; F = (1/2, 1, 1/2)
    # paper P = (.5/2, (.3+.6)/2, .3/2) = (.25, .45, .15); L = 3 (.125 + .45 + .075) = 1.95
    assert moga.group_balance_loss(logits, top_k=2).item() == pytest.approx(1.95, abs=1e-12)
    # switch P = (.3, .45, .25); L = 3 (.15 + .45 + .125) = 2.175
    assert moga.group_balance_loss(logits, top_k=2, form="switch").item() == pytest.approx(2.175, abs=1e-12)


def test_balance_loss_gradient_flows_to_logits():
    logits = torch.randn(3, 10, 4, requires_grad=True)
    moga.group_balance_loss(logits).backward()
    assert logits.grad.abs().sum() > 0


def test_balance_loss_bad_form():
    with pytest.raises(ValueError, match="form"):
        moga.group_balance_loss(torch.randn(2, 3), form="nope")


@pytest.mark.parametrize("form", ["paper", "switch"])
def test_balance_loss_non_finite_logits(form):
    """Default: a NaN (or +inf, or all -inf) logit gives a NaN loss without a word, as documented;
    check_finite=True raises instead. -inf on some groups of a token is legitimate ("never this group")."""
    good = torch.randn(2, 6, 4)
    good[0, 1, 2] = float("-inf")
    assert torch.isfinite(moga.group_balance_loss(good, 2, form=form, check_finite=True))
    for value, where in [(float("nan"), (1, 3, 0)), (float("inf"), (0, 0, 3)), (float("-inf"), (1, 2, slice(None)))]:
        bad = good.clone()
        bad[where] = value
        assert moga.group_balance_loss(bad, 2, form=form).isnan()
        with pytest.raises(ValueError, match="1 of 12 tokens have a NaN or \\+inf logit"):
            moga.group_balance_loss(bad, 2, form=form, check_finite=True)
    bad = good.clone().requires_grad_(True)
    with torch.no_grad():
        bad[:, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="2 of 12 tokens"):
        moga.group_balance_loss(bad, form=form, check_finite=True)


@pytest.mark.parametrize("fn", [moga.route_tokens, moga.group_balance_loss])
def test_bad_router_logits_raise(fn):
    with pytest.raises(TypeError, match="router_logits must be a torch.Tensor"):
        fn([[0.1, 0.9]])
    with pytest.raises(TypeError, match="floating-point"):
        fn(torch.zeros(2, 3, dtype=torch.long))
    for shape in [(), (2, 0)]:
        with pytest.raises(ValueError, match=r"router_logits must have shape \(\.\.\., num_groups\)"):
            fn(torch.zeros(shape))


def test_route_tokens_topk_order_ties_and_gates():
    logits = torch.tensor([[[0.0, 2.0, 2.0, -1.0], [1.0, 1.0, 1.0, 1.0]]])
    probs, groups, gates = moga.route_tokens(logits, top_k=2)
    assert groups.tolist() == [[[1, 2], [0, 1]]]
    p_max = math.exp(2) / (1 + 2 * math.exp(2) + math.exp(-1))  # softmax of (0, 2, 2, -1) at a 2
    torch.testing.assert_close(gates, torch.tensor([[[p_max, p_max], [0.25, 0.25]]]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2))


def test_router_module():
    router = moga.MoGARouter(16, 5)
    x = torch.randn(2, 7, 16)
    assert router(x).shape == (2, 7, 5)
    assert router.proj.bias is None and moga.MoGARouter(16, 5, bias=True).proj.bias is not None
    with pytest.raises(ValueError, match="last dim 16"):
        router(torch.randn(2, 7, 8))


def test_sort_by_segment_is_stable_counting_sort():
    keys = torch.randint(-2, 6, (1000,))
    order, offsets = sort_by_segment(keys, 6)
    sort_key = torch.where(keys < 0, 6, keys)
    assert torch.equal(order, torch.sort(sort_key, stable=True).indices)
    counts = torch.bincount(keys[keys >= 0], minlength=6)
    assert offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()


def test_routed_layout_positions_cover_every_entry():
    groups = torch.randint(-1, 4, (2, 33, 1))
    routed = routed_layout(groups, 4)
    seg = routed.segments
    assert seg.num_segments == 8
    # each segment holds exactly the tokens of that (row, group), in original order
    for s in range(8):
        a, b = seg.q_offsets[s].item(), seg.q_offsets[s + 1].item()
        row, g = divmod(s, 4)
        want = (torch.nonzero(groups[row, :, 0] == g).flatten() + row * 33).tolist()
        assert seg.q_index[a:b].tolist() == want
    assert torch.equal(seg.q_index[routed.position], torch.arange(66))
    assert math.isclose(seg.q_offsets[-1].item(), (groups >= 0).sum().item())
