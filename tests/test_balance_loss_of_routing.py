"""moga.router.balance_loss_of_routing refuses an unknown form (as group_balance_loss does) instead of silently
computing the Switch form."""

from __future__ import annotations

import pytest
import torch

from moga.router import balance_loss_of_routing, route_tokens


def test_unknown_form_is_refused():
    probs, groups, _ = route_tokens(torch.randn(2, 7, 3), 2)
    with pytest.raises(ValueError, match="form must be 'paper' or 'switch', got 'Paper'"):
        balance_loss_of_routing(probs, groups, form="Paper")
