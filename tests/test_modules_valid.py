"""MoGAAttention.forward(valid=...) and moga_layer_attention(valid=...): padded tokens are neither queries nor keys
of any branch (routed, STGA with context frames, per-frame); their attention output is 0 (the layer's output there is
the output projection's bias) and the balance loss counts valid tokens only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moga.modules import MoGAAttention, moga_layer_attention
from moga.reference import masked_attention_ref
from moga.router import group_balance_loss
from moga.window import window_mask_ref
from tests.utils import assert_weighted_grads_match, rel_err, valid_rows_ref

GRID, DIM, HEADS, M = (2, 3, 4), 64, 2, 3
N = 24


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_layer_with_padding_matches_reference(backend):
    layer = MoGAAttention(
        DIM, HEADS, M, window=(2, 2, 2), frame_attention=True, top_k=2, context_frames=1, qk_norm=True, backend=backend
    )
    x = torch.randn(2, N, DIM, requires_grad=True)
    valid = torch.ones(2, N, dtype=torch.bool)
    valid[0, 18:] = False
    valid[1, 1::5] = False
    got = layer(x, grid=GRID, shot_starts=[1], valid=valid)

    q = layer.norm_q(layer.to_q(x)).unflatten(2, (HEADS, -1))
    k = layer.norm_k(layer.to_k(x)).unflatten(2, (HEADS, -1))
    v = layer.to_v(x).unflatten(2, (HEADS, -1))
    logits = layer.router(x)
    pair = valid[:, :, None] & valid[:, None, :]
    branches = [
        valid_rows_ref(q, k, v, logits, valid, 2),
        masked_attention_ref(q, k, v, window_mask_ref(GRID, (2, 2, 2), [1], 1)[None] & pair),
        masked_attention_ref(q, k, v, window_mask_ref(GRID, (1, 3, 4))[None] & pair),
    ]
    attn = sum(branches) / 3
    want = F.linear(attn.flatten(2), layer.to_out.weight.double(), layer.to_out.bias.double())
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got[~valid], layer.to_out.bias.expand(int((~valid).sum()), -1))
    assert_weighted_grads_match(got, want, (x,), ["x"], valid)
    want_loss = group_balance_loss(logits[valid], 2, form="paper")
    assert torch.allclose(layer.last_balance_loss, want_loss)


def test_bad_valid_raises():
    layer = MoGAAttention(DIM, HEADS, M)
    x = torch.randn(2, N, DIM)
    with pytest.raises(ValueError, match="shape"):
        layer(x, valid=torch.ones(2, N + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        layer(x, valid=torch.ones(2, N))


def test_valid_refused_where_unsupported():
    x, valid = torch.randn(1, N, DIM), torch.ones(1, N, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="kmeans"):
        MoGAAttention(DIM, HEADS, M, router="kmeans")(x, valid=valid)
    q = torch.randn(1, N, HEADS, DIM // HEADS)
    with pytest.raises(NotImplementedError, match="sequence_parallel_group"):
        moga_layer_attention(q, q, q, torch.randn(1, N, M), sequence_parallel_group=object(), valid=valid)
