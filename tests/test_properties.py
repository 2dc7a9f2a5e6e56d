"""Property tests: random shapes, group layouts, top_k and dtypes against the float64 reference, on every
CPU-runnable backend. Reproducible in CI: derandomized, no example database."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moga
from moga._alloc import poisoned_outputs
from moga.backends import get_backend
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import TOL, cpu_backends

BACKENDS = cpu_backends()
# Triton runs through its interpreter on the CPU (about a second per small case): fewer, smaller examples.
MAX_EXAMPLES = {"triton": 12}
MAX_N = {"triton": 40}


def _settings(backend: str) -> settings:
    return settings(
        max_examples=MAX_EXAMPLES.get(backend, 50),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@st.composite
def shapes(draw, backend: str):
    """(B, N, Hq, Hkv, D, dtype, seed)."""
    B = draw(st.integers(1, 3))
    N = draw(st.integers(0, MAX_N.get(backend, 96)))
    Hkv = draw(st.integers(1, 2))
    Hq = Hkv * draw(st.sampled_from([1, 2, 4]))
    D = draw(st.sampled_from([32, 64, 32, 16]))  # 16: Triton must refuse it with a clear ValueError
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    seed = draw(st.integers(0, 2**31 - 1))
    return B, N, Hq, Hkv, D, dtype, seed


@st.composite
def group_ids(draw, B: int, N: int, gen: torch.Generator):
    """(ids (B, N) int64, num_groups or None) of a drawn kind of layout."""
    kind = draw(st.sampled_from(["ragged", "singletons", "one_giant", "padding", "sparse_ids", "one_big_many_small"]))
    if kind == "ragged":
        G = draw(st.integers(1, 8))
        ids = torch.randint(0, G, (B, N), generator=gen)
    elif kind == "singletons":
        ids = torch.stack([torch.randperm(N, generator=gen) for _ in range(B)]) if N else torch.zeros(B, 0)
    elif kind == "one_giant":
        ids = torch.full((B, N), draw(st.integers(0, 5)))
    elif kind == "padding":  # about a third padding, any negative value
        ids = torch.randint(-3, 4, (B, N), generator=gen).clamp(min=-1) * torch.randint(1, 3, (B, N), generator=gen)
    elif kind == "sparse_ids":  # few ids spread over a wide range: many empty groups when num_groups is given
        ids = torch.tensor([0, 17, 63])[torch.randint(0, 3, (B, N), generator=gen)]
    else:  # one group holding most tokens beside several singletons
        ids = torch.where(torch.rand(B, N, generator=gen) < 0.8, 0, torch.randint(1, 1000, (B, N), generator=gen))
    ids = ids.long()
    num_groups = None
    if draw(st.booleans()) and ids.numel() and kind != "one_big_many_small":
        num_groups = int(ids.max().clamp(min=0)) + 1 + draw(st.integers(0, 3))
    return ids, num_groups


def _unsupported(backend: str, q: torch.Tensor, k: torch.Tensor) -> str | None:
    flat = q.flatten(0, 1) if q.numel() else q.reshape(-1, *q.shape[2:])
    kflat = k.reshape(-1, *k.shape[2:])
    return get_backend(backend).unsupported_reason(flat, kflat, kflat)


def _inputs(B, N, Hq, Hkv, D, dtype, gen):
    q = torch.randn(B, N, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, N, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, N, Hkv, D, generator=gen).to(dtype)
    return q, k, v


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, floor: float) -> None:
    """Relative error against the reference, its norm floored at ``floor``.

    A gradient whose exact value is zero (a query with one key, a token alone in all its groups) comes out of
    float64 as rounding noise and of float32 as larger rounding noise: relative error means nothing there,
    so the denominator never drops below a fixed fraction of the incoming gradient's norm.
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite entries (unwritten poisoned output?)"
    err = (got.double() - want).norm().item() / max(want.norm().item(), floor, 1e-300)
    tol = TOL[dtype]
    if dtype == torch.float16 and name != "out":
        # Half-precision gradients pass through fp16-rounded out/dout (delta = rowsum(dout * out)), which the
        # cancellation in dP - delta amplifies for queries with one or two keys; tests/test_cpu_backend.py
        # bounds fp16 gradients at 2e-3 too.
        tol = 2e-3
    assert err < tol, f"{name}: rel err {err:.2e} >= {tol:.0e}"


def _check(backend, fn, ref_fn, inputs, dtype):
    """Forward and every input gradient vs the float64 reference; unsupported inputs must raise ValueError."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    refs = [t.detach().double().requires_grad_(True) for t in inputs]
    reason = _unsupported(backend, leaves[0], leaves[1])
    if reason is not None:
        with pytest.raises(ValueError, match="cannot run"):
            fn(*leaves)
        return
    ref = ref_fn(*refs)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dout)
    with poisoned_outputs():
        out = fn(*leaves)
        assert out.dtype == dtype
        out.backward(dout.to(out.dtype))
    floor = 0.1 * dout.norm().item()
    _compare("out", out, ref, dtype, floor)
    for i, (leaf, r) in enumerate(zip(leaves, refs, strict=True)):
        # the router's gradient goes through the attention output: it has the precision of q's dtype
        _compare(f"grad {i}", leaf.grad, r.grad, dtype, floor)


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_attention_matches_reference(backend):
    @_settings(backend)
    @given(data=st.data())
    def prop(data):
        B, N, Hq, Hkv, D, dtype, seed = data.draw(shapes(backend))
        gen = torch.Generator().manual_seed(seed)
        ids, num_groups = data.draw(group_ids(B, N, gen))
        q, k, v = _inputs(B, N, Hq, Hkv, D, dtype, gen)
        _check(
            backend,
            lambda q, k, v: moga.group_attention(q, k, v, ids, num_groups=num_groups, backend=backend),
            lambda q, k, v: group_attention_ref(q, k, v, ids),
            (q, k, v),
            dtype,
        )

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_moga_attention_matches_reference(backend):
    @_settings(backend)
    @given(data=st.data())
    def prop(data):
        B, N, Hq, Hkv, D, dtype, seed = data.draw(shapes(backend))
        gen = torch.Generator().manual_seed(seed)
        M = data.draw(st.integers(1, 6))
        top_k = data.draw(st.integers(1, M))
        # a sharp router (large logits) puts most tokens in few groups; a flat one spreads them
        logits = torch.randn(B, N, M, generator=gen) * data.draw(st.sampled_from([0.1, 1.0, 8.0]))
        q, k, v = _inputs(B, N, Hq, Hkv, D, dtype, gen)
        _check(
            backend,
            lambda q, k, v, r: moga.moga_attention(q, k, v, r, top_k=top_k, backend=backend),
            lambda q, k, v, r: moga_attention_ref(q, k, v, r, top_k=top_k),
            (q, k, v, logits),
            dtype,
        )

    prop()
