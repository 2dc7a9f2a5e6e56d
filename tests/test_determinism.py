"""Deterministic mode: the flag kernel backends read, and bitwise reproducible results on every CPU backend."""

from __future__ import annotations

import threading
import types

import pytest
import torch

import moga
import moga.functional
from moga._determinism import deterministic_enabled, deterministic_mode
from moga.backends._autograd import segment_attention_autograd
from moga.kernels.segment_attention.naive import segment_attention_naive
from tests.utils import cpu_backends, qkv

BACKENDS = cpu_backends()


@pytest.fixture
def torch_deterministic():
    """torch.use_deterministic_algorithms(True) for one test, then the previous setting back."""
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def test_flag_off_by_default_and_scoped():
    assert not deterministic_enabled()
    with deterministic_mode(True):
        assert deterministic_enabled()
        with deterministic_mode(False):  # an inner call cannot switch off an outer request
            assert deterministic_enabled()
        assert deterministic_enabled()
    assert not deterministic_enabled()
    with pytest.raises(RuntimeError), deterministic_mode(True):
        raise RuntimeError("boom")
    assert not deterministic_enabled(), "the flag must be restored when the body raises"


def test_flag_follows_torch_global(torch_deterministic):
    assert deterministic_enabled()
    with deterministic_mode(False):
        assert deterministic_enabled()


def test_flag_is_per_thread():
    seen = []
    with deterministic_mode(True):
        t = threading.Thread(target=lambda: seen.append(deterministic_enabled()))
        t.start()
        t.join()
    assert seen == [False]


def test_keyword_type_checked():
    q, k, v = qkv(1, 8, 1, 1, 16)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long), deterministic=1)


def _spy_backend(log: list[tuple[str, bool]]) -> types.ModuleType:
    """A kernel backend (naive fwd + autograd bwd through _autograd.py) that records the flag it sees."""

    def fwd(q, k, v, layout, scale):
        log.append(("fwd", deterministic_enabled()))
        out, lse = segment_attention_naive(q, k, v, layout, scale)
        return out, lse.float()

    def bwd(dout, q, k, v, out, lse, layout, scale):
        log.append(("bwd", deterministic_enabled()))
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
            o, _ = segment_attention_naive(*leaves, layout, scale)
            return torch.autograd.grad(o, leaves, dout)

    mod = types.ModuleType("spy_backend")
    mod.segment_attention = lambda q, k, v, layout, scale: segment_attention_autograd(q, k, v, layout, scale, fwd, bwd)
    return mod


@pytest.mark.parametrize("api", ["group", "moga"])
@pytest.mark.parametrize("mode", ["keyword", "torch_global", "off"])
def test_kernel_backend_sees_flag_in_fwd_and_bwd(monkeypatch, request, api, mode):
    log: list[tuple[str, bool]] = []
    spy = _spy_backend(log)
    monkeypatch.setattr(moga.functional, "select_backend", lambda *args: spy)
    if mode == "torch_global":
        request.getfixturevalue("torch_deterministic")
    q, k, v = qkv(1, 24, 2, 1, 32)
    kw = {"deterministic": mode == "keyword"}
    if api == "group":
        out = moga.group_attention(q, k, v, torch.randint(0, 3, (1, 24)), **kw)
    else:
        out = moga.moga_attention(q, k, v, torch.randn(1, 24, 3), top_k=2, **kw)
    assert not deterministic_enabled() or mode == "torch_global", "the keyword must not leak past the call"
    out.sum().backward()
    want = mode != "off"
    assert log == [("fwd", want), ("bwd", want)]
    assert not deterministic_enabled() or mode == "torch_global", "the keyword must not leak past backward"


def _run_twice(fn, inputs):
    """Forward and backward twice from identical inputs; return both (out, grads...) tuples."""
    results = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.linspace(-1, 1, out.numel(), device=out.device).view(out.shape).to(out.dtype))
        results.append((out.detach(),) + tuple(t.grad for t in leaves if t.requires_grad))
    return results


def _assert_bitwise(results):
    first, second = results
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert a is not None and b is not None, f"tensor {i}: no gradient"
        assert torch.equal(a, b), f"tensor {i} differs between runs: max diff {(a - b).abs().max().item():.3e}"


def _cases(backend, deterministic):
    """(name, fn, inputs) of group and moga attention with ragged groups, GQA and top_k 2."""
    q, k, v = qkv(2, 40, 4, 2, 32, requires_grad=False)  # small: Triton runs in its interpreter here
    ids = torch.randint(-1, 5, (2, 40))
    logits = torch.randn(2, 40, 4)
    yield "group", lambda q, k, v: moga.group_attention(
        q, k, v, ids, backend=backend, deterministic=deterministic
    ), (q, k, v)
    for top_k in (1, 2):
        yield f"moga_top{top_k}", lambda q, k, v, r, top_k=top_k: moga.moga_attention(
            q, k, v, r, top_k=top_k, backend=backend, deterministic=deterministic
        ), (q, k, v, logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_with_keyword(backend):
    for name, fn, inputs in _cases(backend, deterministic=True):
        results = _run_twice(fn, inputs)
        assert len(results[0]) == len(inputs) + 1, name
        _assert_bitwise(results)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_with_torch_global(backend, torch_deterministic):
    for _name, fn, inputs in _cases(backend, deterministic=False):
        _assert_bitwise(_run_twice(fn, inputs))


GPU_BACKENDS = [b for b in ("cuda", "triton") if b in moga.available_backends()] if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bitwise_on_gpu_with_repeated_tokens(backend, dtype):
    """top_k = 2 makes every token a query and key of two segments: the gradient rows of a token come from
    several programs, the case where float atomics would make the sum order (and the bits) vary."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4096, h, 64, device="cuda", generator=gen).to(dtype) for h in (8, 2, 2))
    logits = torch.randn(2, 4096, 8, device="cuda", generator=gen)

    def fn(q, k, v, r):
        return moga.moga_attention(q, k, v, r, top_k=2, backend=backend, deterministic=True)

    _assert_bitwise(_run_twice(fn, (q, k, v, logits)))
