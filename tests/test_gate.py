"""The gated un-permute against its definition, across chunk boundaries, with gradients."""

from __future__ import annotations

import pytest
import torch

import moga.gate as gate_mod
from moga.gate import gated_unpermute


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 25])  # one token per chunk, ragged chunks, one chunk
def test_matches_definition_and_gradcheck(monkeypatch, K, chunk_elements):
    monkeypatch.setattr(gate_mod, "_CHUNK_ELEMENTS", chunk_elements)
    T, H, D = 7, 2, 3
    out_seg = torch.randn(T * K, H, D, dtype=torch.float64, requires_grad=True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    out = gated_unpermute(out_seg, position, gates)
    want = (out_seg[position].view(T, K, H, D) * gates[:, :, None, None]).sum(1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda o, g: gated_unpermute(o, position, g), (out_seg, gates))


def test_low_precision_output_computed_in_fp32():
    T, K, H, D = 5, 2, 2, 8
    out_seg = torch.randn(T * K, H, D).to(torch.bfloat16)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K)
    out = gated_unpermute(out_seg, position, gates)
    assert out.dtype == torch.bfloat16
    want = (out_seg[position].view(T, K, H, D).float() * gates[:, :, None, None]).sum(1)
    # one rounding of the fp32 result to bf16, nothing more
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)


def test_autocast_does_not_lower_the_product_precision():
    """Under a bf16 autocast region einsum would run in bf16; the gated sum must stay the float32 one, bit for bit."""
    T, K, H, D = 40, 2, 2, 16
    out_seg = torch.randn(T * K, H, D, requires_grad=True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K, requires_grad=True)
    want = gated_unpermute(out_seg, position, gates)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gated_unpermute(out_seg, position, gates)
        assert got.dtype == torch.float32
        dout = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, (out_seg, gates), dout)
    want_grads = torch.autograd.grad(want, (out_seg, gates), dout)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)
