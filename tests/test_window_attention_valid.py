"""window_attention(valid=...): padded tokens are neither queries nor keys of any window (context rows included),
their outputs are 0 and they get no gradient; checked against the dense float64 window reference with the padding
removed from its mask."""

from __future__ import annotations

import pytest
import torch

from moga.reference import masked_attention_ref
from moga.window import window_attention, window_mask_ref
from tests._gpu_backends import gpu_backends
from tests.utils import assert_weighted_grads_match, rel_err

GRID, H, D = (4, 3, 5), 2, 32  # N = 60, not a multiple of any block
N = 60


def make_valid() -> torch.Tensor:
    valid = torch.ones(3, N, dtype=torch.bool)
    valid[0, 40:] = False  # the last frames padded
    valid[1, ::4] = False  # scattered
    valid[2] = False  # all padding
    return valid


CASES = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu")] + [(b, "cuda") for b in gpu_backends()]


@pytest.mark.parametrize("backend,device", CASES)
def test_valid_matches_reference_with_gradients(backend, device):
    q, k, v = (torch.randn(3, N, H, D, requires_grad=True) for _ in range(3))
    valid = make_valid()
    window, shots, ctx = (2, 2, 3), [1, 3], 1
    got = window_attention(
        q.to(device), k.to(device), v.to(device), GRID, window, shot_starts=shots, context_frames=ctx,
        backend=backend, valid=valid.to(device),
    ).cpu()  # fmt: skip
    mask = window_mask_ref(GRID, window, shots, ctx)[None] & valid[:, :, None] & valid[:, None, :]
    want = masked_attention_ref(q, k, v, mask)
    assert rel_err(got, want) < 1e-5
    assert torch.equal(got[~valid], torch.zeros_like(got[~valid]))
    assert_weighted_grads_match(got, want, (q, k, v), list("qkv"), valid)


def test_all_valid_equals_no_mask_and_bad_valid_raises():
    q = torch.randn(2, N, H, D)
    want = window_attention(q, q, q, GRID, (2, 2, 2), backend="cpu")
    got = window_attention(q, q, q, GRID, (2, 2, 2), backend="cpu", valid=torch.ones(2, N, dtype=torch.bool))
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="shape"):
        window_attention(q, q, q, GRID, (2, 2, 2), valid=torch.ones(2, N - 1, dtype=torch.bool))
