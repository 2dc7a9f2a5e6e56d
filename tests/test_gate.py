"""The gated un-permute against its definition, across chunk boundaries, with gradients; both implementations
(the compiled ops of moga._C and the chunked torch composition)."""

from __future__ import annotations

import pytest
import torch

import moga.gate as gate_mod
from moga import _alloc, _ops
from moga.gate import gated_unpermute
from tests.utils import rel_err, run_python

HAS_COMPILED = _ops.ops_available("cpu", "gated_unpermute") and _ops.ops_available("cpu", "gated_unpermute_bwd")
IMPLS = ["torch", pytest.param("compiled", marks=pytest.mark.skipif(not HAS_COMPILED, reason="moga._C not built"))]


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("chunk_elements", [1, 50, 1 << 25])  # one token per chunk, ragged chunks, one chunk
def test_torch_path_matches_definition_and_gradcheck(monkeypatch, K, chunk_elements):
    monkeypatch.setattr(gate_mod, "_CHUNK_ELEMENTS", chunk_elements)
    T, H, D = 7, 2, 3
    out_seg = torch.randn(T * K, H, D, dtype=torch.float64, requires_grad=True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    out = gated_unpermute(out_seg, position, gates, impl="torch")
    want = (out_seg[position].view(T, K, H, D) * gates[:, :, None, None]).sum(1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda o, g: gated_unpermute(o, position, g, impl="torch"), (out_seg, gates))


@pytest.mark.skipif(not HAS_COMPILED, reason="moga._C not built")
@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("T", [0, 1, 37])
def test_compiled_matches_definition_and_gradcheck(K, T):
    H, D = 3, 5
    out_seg = torch.randn(T * K, H, D, dtype=torch.float64, requires_grad=True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    with _alloc.poisoned_outputs():
        _ops.sync_poison_outputs()
        out = gated_unpermute(out_seg, position, gates, impl="compiled")
    _ops.sync_poison_outputs()
    want = (out_seg[position].view(T, K, H, D) * gates[:, :, None, None]).sum(1)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if T > 0:
        assert torch.autograd.gradcheck(lambda o, g: gated_unpermute(o, position, g, impl="compiled"), (out_seg, gates))


@pytest.mark.skipif(not HAS_COMPILED, reason="moga._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gates_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_matches_torch_path_poisoned(dtype, gates_dtype):
    """Same values as the torch path (fp32 accumulation, one rounding), every output and gradient element written."""
    T, K, H, D = 50, 2, 4, 24
    out_seg = torch.randn(T * K, H, D).to(dtype).requires_grad_(True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K).to(gates_dtype).requires_grad_(True)
    dout = torch.randn(T, H, D).to(dtype)
    results = {}
    for impl in ("torch", "compiled"):
        with _alloc.poisoned_outputs():
            _ops.sync_poison_outputs()
            out = gated_unpermute(out_seg, position, gates, impl=impl)
            grads = torch.autograd.grad(out, (out_seg, gates), dout)
        _ops.sync_poison_outputs()
        assert out.dtype == dtype and grads[0].dtype == dtype and grads[1].dtype == gates_dtype
        results[impl] = (out, *grads)
    for name, got, want in zip(("out", "d_out_seg", "d_gates"), results["compiled"], results["torch"], strict=True):
        assert not got.isnan().any(), name
        # out, d_out_seg: sums of K terms, equal up to one rounding in their dtype. d_gates: float32 sums of H * D
        # products, whose order differs between the two implementations (a few float32 ulps), then one rounding.
        tol = 2 * torch.finfo(got.dtype).eps + (1e-6 if name == "d_gates" else 0.0)
        assert rel_err(got, want.double()) <= tol, name


@pytest.mark.skipif(not HAS_COMPILED, reason="moga._C not built")
def test_compiled_rejects_bad_inputs():
    out_seg, gates = torch.randn(6, 2, 4), torch.rand(3, 2)
    ops = torch.ops.moga
    with pytest.raises(ValueError, match="is not a row of out_seg"):
        ops.gated_unpermute(out_seg, torch.tensor([0, 1, 2, 3, 4, 6]), gates)
    with pytest.raises(ValueError, match="occurs twice"):
        ops.gated_unpermute(out_seg, torch.tensor([0, 1, 2, 3, 4, 4]), gates)
    with pytest.raises(ValueError, match="one row per entry"):
        ops.gated_unpermute(out_seg, torch.arange(6), torch.rand(2, 2))
    with pytest.raises(TypeError, match="must be int64"):
        ops.gated_unpermute(out_seg, torch.arange(6, dtype=torch.int32), gates)
    with pytest.raises(TypeError, match="gates must be floating point"):
        ops.gated_unpermute(out_seg, torch.arange(6), torch.ones(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="dout must have shape"):
        ops.gated_unpermute_bwd(torch.randn(3, 2, 5), out_seg, torch.arange(6), gates)
    with pytest.raises(TypeError, match="dout must have the dtype"):
        ops.gated_unpermute_bwd(torch.randn(3, 2, 4, dtype=torch.float64), out_seg, torch.arange(6), gates)
    with pytest.raises(ValueError, match="impl must be one of"):
        gated_unpermute(out_seg, torch.arange(6), gates, impl="cuda")


@pytest.mark.parametrize("impl", IMPLS)
def test_low_precision_output_computed_in_fp32(impl):
    T, K, H, D = 5, 2, 2, 8
    out_seg = torch.randn(T * K, H, D).to(torch.bfloat16)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K)
    out = gated_unpermute(out_seg, position, gates, impl=impl)
    assert out.dtype == torch.bfloat16
    want = (out_seg[position].view(T, K, H, D).float() * gates[:, :, None, None]).sum(1)
    # one rounding of the fp32 result to bf16, nothing more
    torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_autocast_does_not_lower_the_product_precision(impl):
    """Under a bf16 autocast region einsum would run in bf16; the gated sum must stay the float32 one, bit for bit."""
    T, K, H, D = 40, 2, 2, 16
    out_seg = torch.randn(T * K, H, D, requires_grad=True)
    position = torch.randperm(T * K)
    gates = torch.rand(T, K, requires_grad=True)
    want = gated_unpermute(out_seg, position, gates, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gated_unpermute(out_seg, position, gates, impl=impl)
        assert got.dtype == torch.float32
        dout = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, (out_seg, gates), dout)
    want_grads = torch.autograd.grad(want, (out_seg, gates), dout)
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert torch.equal(g, w)


@pytest.mark.parametrize("value, expect", [("torch", "torch"), ("", "auto"), ("bogus", "ValueError")])
def test_gate_impl_from_environment(value, expect):
    proc = run_python("import moga.gate as g; print(g._AUTO)", MOGA_GATE_IMPL=value)
    if expect == "ValueError":
        assert proc.returncode != 0 and "MOGA_GATE_IMPL must be one of" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expect


def test_auto_follows_the_environment_choice(monkeypatch):
    """With MOGA_GATE_IMPL=torch, impl="auto" takes the torch path (its chunking is observable)."""
    calls = []
    monkeypatch.setattr(gate_mod, "_AUTO", "torch")
    monkeypatch.setattr(gate_mod._GatedUnpermute, "apply", lambda *a: calls.append("torch") or a[0][: a[2].shape[0]])
    gated_unpermute(torch.randn(4, 1, 2), torch.arange(4), torch.rand(4, 1))
    assert calls == ["torch"]
