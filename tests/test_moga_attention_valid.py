"""moga_attention(valid=...): padded tokens (False) are neither queries nor keys, output 0, get no gradient.

The reference runs the float64 MoGA reference on each batch row's valid tokens alone (ragged rows, a row that is
all padding) and puts zeros at the padding.
"""

from __future__ import annotations

import pytest
import torch

from moga import moga_attention
from tests._gpu_backends import gpu_backends
from tests.utils import assert_weighted_grads_match, rel_err, valid_rows_ref

H, D, M = 2, 32, 3


def make_valid(N: int) -> torch.Tensor:
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[0, N - 7 :] = False  # trailing padding
    valid[1, ::3] = False  # scattered padding
    valid[2] = False  # nothing valid
    return valid


CASES = [("torch", "cpu", 37, 1), ("cpu", "cpu", 37, 2), ("cpu", "cpu", 70, 1), ("triton", "cpu", 70, 2)]
CASES += [(b, "cuda", n, top_k) for b in gpu_backends() for n, top_k in ((37, 1), (300, 2))]


@pytest.mark.parametrize("backend,device,N,top_k", CASES)
def test_valid_matches_reference_on_valid_tokens_with_gradients(backend, device, N, top_k):
    q, k, v = (torch.randn(3, N, H, D, requires_grad=True) for _ in range(3))
    logits = torch.randn(3, N, M, requires_grad=True)
    valid = make_valid(N)
    dev = [t.to(device) for t in (q, k, v, logits)]
    got = moga_attention(*dev, top_k=top_k, backend=backend, valid=valid.to(device)).cpu()
    want = valid_rows_ref(q, k, v, logits, valid, top_k)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))  # exactly zero, not merely small
    assert_weighted_grads_match(got, want, (q, k, v, logits), "q k v logits".split(), valid)


def test_all_valid_equals_no_mask():
    q, k, v = (torch.randn(2, 40, H, D) for _ in range(3))
    logits = torch.randn(2, 40, M)
    want = moga_attention(q, k, v, logits, top_k=2, backend="cpu")
    got = moga_attention(q, k, v, logits, top_k=2, backend="cpu", valid=torch.ones(2, 40, dtype=torch.bool))
    assert torch.equal(got, want)


def test_bad_valid_raises():
    q = torch.randn(2, 8, H, D)
    logits = torch.randn(2, 8, M)
    with pytest.raises(TypeError, match="bool"):
        moga_attention(q, q, q, logits, valid=torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        moga_attention(q, q, q, logits, valid=torch.ones(2, 7, dtype=torch.bool))
