"""moga.moga_attention (routed, gated group attention) against the float64 reference, every CPU backend."""

from __future__ import annotations

import pytest
import torch

import moga
from moga._alloc import poisoned_outputs
from moga.reference import moga_attention_ref
from tests.utils import TOL, as_double_leaves, cpu_backends, dense_sdpa, qkv, rel_err

BACKENDS = cpu_backends()


def _check(backend, q, k, v, logits, top_k, tol=None):
    tol = tol or TOL[q.dtype]
    q64, k64, v64, l64 = as_double_leaves(q, k, v, logits)
    ref = moga_attention_ref(q64, k64, v64, l64, top_k=top_k)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    with poisoned_outputs():
        out = moga.moga_attention(q, k, v, logits, top_k=top_k, backend=backend)
        out.backward(dout.to(out.dtype))
    grads = (("out", out, ref), ("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad),
             ("d_logits", logits.grad, l64.grad))
    for name, got, want in grads:
        assert torch.isfinite(got).all(), f"{name} has non-finite entries"
        if want.norm() < 1e-10:  # mathematically zero (e.g. gates of a token in every group): compare absolutely
            assert got.abs().max() < 10 * tol, f"{name} should be zero, max {got.abs().max():.2e}"
            continue
        err = rel_err(got, want)
        assert err < tol, f"{name}: rel err {err:.2e} >= {tol:.0e}"
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("B,N,Hq,Hkv,D,M", [(1, 37, 2, 2, 32, 4), (2, 100, 4, 2, 64, 5), (1, 64, 4, 1, 32, 3)])
def test_moga_matches_reference(backend, top_k, B, N, Hq, Hkv, D, M):
    q, k, v = qkv(B, N, Hq, Hkv, D)
    logits = (2 * torch.randn(B, N, M)).requires_grad_(True)
    _check(backend, q, k, v, logits, top_k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_gradient_is_nonzero(backend):
    q, k, v = qkv(1, 48, 2, 2, 32)
    logits = torch.randn(1, 48, 4, requires_grad=True)
    moga.moga_attention(q, k, v, logits, backend=backend).square().sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def _check_dense(backend, B, N, D, M, top_k) -> torch.Tensor:
    """_check on random q/k/v (B, N, 2, D), logits (B, N, M); the output is also dense SDPA. Returns the logits."""
    q, k, v = qkv(B, N, 2, 2, D)
    logits = torch.randn(B, N, M, requires_grad=True)
    out = _check(backend, q, k, v, logits, top_k)
    assert rel_err(out, dense_sdpa(q, k, v)) < 1e-5
    return logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_is_dense_attention(backend):
    logits = _check_dense(backend, 2, 53, 64, 1, top_k=1)
    assert logits.grad.abs().max() < 1e-6  # p == 1 for every logit value: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_k_equal_m_is_gated_dense(backend):
    # every token in every group: each group is dense attention, gates sum to one
    _check_dense(backend, 1, 30, 32, 3, top_k=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    q, k, v = qkv(1, 64, 2, 2, 64, dtype=torch.float16)
    logits = torch.randn(1, 64, 4, requires_grad=True)
    _check(backend, q, k, v, logits, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_stay_in_their_token(backend):
    q, k, v = qkv(1, 40, 2, 2, 32, requires_grad=False)
    logits = torch.randn(1, 40, 4)
    logits[0, 7, 2] = float("nan")
    out = moga.moga_attention(q, k, v, logits, backend=backend)
    bad = ~torch.isfinite(out).all(-1).all(-1)[0]
    # token 7's probabilities are all NaN, so its gate is: its own output is NaN, and nothing else is touched
    assert bad.nonzero().flatten().tolist() == [7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_lower_group(backend):
    q, k, v = qkv(1, 24, 2, 2, 32, requires_grad=False)
    logits = torch.zeros(1, 24, 4)  # all tied: every token in group 0 (top-1) or {0, 1} (top-2)
    for top_k in (1, 2):
        out = moga.moga_attention(q, k, v, logits, top_k=top_k, backend=backend)
        ids = torch.zeros(1, 24, dtype=torch.long)
        expected = moga.group_attention(q, k, v, ids, backend="torch") * (top_k / 4)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
