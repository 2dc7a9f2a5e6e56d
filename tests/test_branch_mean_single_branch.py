"""A MoGA layer with the routed branch alone (apply_moga's default: no window, no frame branch) returns the routed
branch's output as it is, as moga_layer_attention does: no float32 round trip through the branch mean, which would
hold up to four more copies of the output at once (24 GB at N = 580K, 40 heads, D = 128 in bf16)."""

from __future__ import annotations

import pytest
import torch

import moga.integrations._core as core
from moga.integrations._block_causal import block_causal_layer_attention
from moga.integrations._core import joint_moga_attention, routed_layer_attention
from moga.modules import moga_layer_attention
from moga.router import route_tokens


@pytest.fixture
def unpermuted(monkeypatch) -> list[torch.Tensor]:
    """The outputs of every gated_unpermute the integrations call (the routed branch's output)."""
    outputs = []
    real = core.gated_unpermute

    def recorded(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    monkeypatch.setattr(core, "gated_unpermute", recorded)
    return outputs


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_branch_alone_is_returned_without_a_copy(unpermuted, dtype):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, 2, 16, dtype=dtype) for _ in range(3))
    logits = torch.randn(2, 24, 3)
    routing = route_tokens(logits, 2)
    got = routed_layer_attention(q, k, v, routing, top_k=2, grid=(4, 2, 3), backend="torch")
    assert got.dtype == dtype and _shares_storage(got, unpermuted[-1])
    assert torch.equal(got, moga_layer_attention(q, k, v, logits, top_k=2, grid=(4, 2, 3), backend="torch"))
    block = block_causal_layer_attention(q, k, v, logits, frames_per_block=2, grid=(4, 2, 3), top_k=2, backend="torch")
    assert _shares_storage(block, unpermuted[-1])
    joint = joint_moga_attention(
        q, k, v, logits, num_text=0, video_first=True, top_k=2, grid=(4, 2, 3), backend="torch"
    )
    assert _shares_storage(joint, unpermuted[-1])


def test_static_branches_still_average_in_float32(unpermuted):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 24, 2, 16, dtype=torch.bfloat16) for _ in range(3))
    logits = torch.randn(2, 24, 3)
    kw = dict(top_k=2, grid=(4, 2, 3), window=(2, 1, 2), backend="torch")
    got = routed_layer_attention(q, k, v, route_tokens(logits, 2), **kw)
    assert not _shares_storage(got, unpermuted[-1])
    assert torch.equal(got, moga_layer_attention(q, k, v, logits, **kw))
