"""Bad input raises ValueError / TypeError naming the argument."""

from __future__ import annotations

import pytest
import torch

import moga
from moga.backends import get_backend


def _qkv(B=1, N=8, Hq=2, Hkv=2, D=16):
    return torch.randn(B, N, Hq, D), torch.randn(B, N, Hkv, D), torch.randn(B, N, Hkv, D)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(8, 2, 16),) + _qkv()[1:], ValueError, "q must have shape"),
        (lambda: (_qkv()[0], torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16)), ValueError, "does not match"),
        (lambda: (_qkv()[0], torch.randn(1, 8, 2, 8), torch.randn(1, 8, 2, 8)), ValueError, "does not match"),
        (lambda: _qkv(Hq=3, Hkv=2), ValueError, "multiple of k/v heads"),
        (lambda: (_qkv()[0], _qkv()[1], torch.randn(1, 8, 1, 16)), ValueError, "same shape"),
        (lambda: (_qkv()[0].half(),) + _qkv()[1:], TypeError, "share a dtype"),
        (lambda: (_qkv()[0].int(),) + _qkv()[1:], TypeError, "float16"),
    ],
)
def test_qkv_errors(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long))


def test_group_ids_errors():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="integer"):
        moga.group_attention(q, k, v, torch.zeros(1, 8))
    with pytest.raises(TypeError, match="integer"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"group_ids must have shape .*\(1, 8\)"):
        moga.group_attention(q, k, v, torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="num_groups"):
        moga.group_attention(q, k, v, torch.full((1, 8), 4), num_groups=4)
    with pytest.raises(ValueError, match="num_groups"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long), num_groups=0)
    with pytest.raises(TypeError, match="num_groups must be an int"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long), num_groups=2.0)


def test_router_logits_and_top_k_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="router_logits must have shape"):
        moga.moga_attention(q, k, v, torch.randn(1, 7, 4))
    with pytest.raises(TypeError, match="floating"):
        moga.moga_attention(q, k, v, torch.zeros(1, 8, 4, dtype=torch.long))
    for bad in (0, 5):
        with pytest.raises(ValueError, match=r"top_k must lie in \[1, num_groups=4\]"):
            moga.moga_attention(q, k, v, torch.randn(1, 8, 4), top_k=bad)
    with pytest.raises(TypeError, match="top_k must be an int"):
        moga.moga_attention(q, k, v, torch.randn(1, 8, 4), top_k=1.0)


def test_scale_and_backend_errors():
    q, k, v = _qkv()
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="softmax_scale"):
        moga.group_attention(q, k, v, ids, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="backend must be"):
        moga.group_attention(q, k, v, ids, backend="fast")
    with pytest.raises(ValueError, match="backend name must be one of"):
        get_backend("fast")


def test_mixed_devices_error():
    q, k, v = (t.to("meta") for t in _qkv())
    with pytest.raises(ValueError, match="group_ids is on cpu"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="one device"):
        moga.group_attention(q, _qkv()[1], v, torch.zeros(1, 8, dtype=torch.long))
