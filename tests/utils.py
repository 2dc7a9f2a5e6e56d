"""Shared test helpers: relative error against float64 references, backends to test, random inputs, spawning
gloo ranks and subprocesses, loading bench scripts."""

from __future__ import annotations

import importlib.util
import os
import pickle
import socket
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import moga
from moga._alloc import poisoned_outputs
from moga.backends import get_backend
from moga.reference import moga_attention_ref

# Relative-error bounds against the float64 reference, by dtype (DEVELOPERS.md "Standards").
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def cpu_backends() -> list[str]:
    """Every backend that can run CPU tensors in this installation."""
    names = []
    for name in moga.available_backends():
        mod = get_backend(name)
        probe = torch.zeros(1, 1, 64)
        if mod.unsupported_reason(probe, probe, probe) is None:
            names.append(name)
    return names


def backend_and_skip_mark(name: str, reason: str) -> tuple[types.ModuleType | None, pytest.MarkDecorator]:
    """The backend module ``name`` where it can run here (it imports and ``is_available()``), else None; and the
    mark (a test module's ``pytestmark``) that skips with ``reason`` where it is None."""
    backend = get_backend(name)
    if backend is not None and not backend.is_available():
        backend = None
    return backend, pytest.mark.skipif(backend is None, reason=reason)


def qkv(B: int, N: int, Hq: int, Hkv: int, D: int, dtype=torch.float32, requires_grad: bool = True):
    q = torch.randn(B, N, Hq, D, dtype=dtype)
    k = torch.randn(B, N, Hkv, D, dtype=dtype)
    v = torch.randn(B, N, Hkv, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def ragged_group_ids(B: int, N: int, sizes: list[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, N) int64 group ids on ``device``: groups of the given sizes (empty and single-token groups allowed), -1
    (padding) for the other N - sum(sizes) positions, shuffled by one ``torch.randperm(N)`` per batch row."""
    ids = torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in enumerate(sizes)])
    ids = torch.cat([ids, torch.full((N - ids.numel(),), -1, dtype=torch.int64)])
    return torch.stack([ids[torch.randperm(N)] for _ in range(B)]).to(device)


def as_double_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_(True) for t in tensors]


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full attention of (B, N, H, D) tensors through PyTorch's SDPA (Hq == Hkv), detached: (B, N, H, D)."""
    return F.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def valid_rows_ref(q, k, v, logits, valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """float64 MoGA reference with padding: each batch row's valid tokens (``valid`` (B, N) bool) attend among
    themselves alone, padded positions are 0. q: (B, N, Hq, D), k/v: (B, N, Hkv, D), logits: (B, N, M)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        idx = torch.nonzero(valid[b]).flatten()
        if idx.numel():
            rows = (t[b : b + 1, idx] for t in (q, k, v, logits))
            out[b, idx] = moga_attention_ref(*rows, top_k)[0]
    return out


def assert_bf16_within_twice_naive(attention: Callable, q, k, v, layout, scale: float) -> None:
    """bf16 standard: ``attention(q, k, v, layout, scale)`` (segment-attention signature; q: (T, Hq, D), k/v:
    (T, Hkv, D), bf16 leaves) is within twice the float64 error of naive.py's segment attention run in bf16, for
    the output and for dq, dk, dv."""
    from moga.kernels.segment_attention import segment_attention_naive  # Triton package: only when called

    out = attention(q, k, v, layout, scale)
    bf16_ref, _ = segment_attention_naive(q, k, v, layout, scale)
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref, _ = segment_attention_naive(q64, k64, v64, layout, scale)
    assert rel_err(out, ref) <= 2 * rel_err(bf16_ref, ref)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    bf16_grads = torch.autograd.grad(bf16_ref, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for name, g, b, r in zip(("dq", "dk", "dv"), grads, bf16_grads, ref_grads, strict=True):
        assert rel_err(g, r) <= 2 * rel_err(b, r), (name, rel_err(g, r), rel_err(b, r))


def segment_errors_vs_naive(segment_attention: Callable, q, k, v, layout, scale: float) -> dict[str, float]:
    """Relative errors against naive.py's segment attention in float64 (Triton kernel package: imported when called)
    of the forward kernels (``segment_attention_fwd``: "out", and "lse" on the rows where the reference's is finite)
    and of ``segment_attention(q, k, v, layout, scale)`` under autograd ("out_autograd" and the token-space "dq",
    "dk", "dv"; one random draw: dout, ``torch.randn_like`` of its output), with every kernel output allocated
    NaN-poisoned (a NaN left anywhere fails the caller's tolerance). Asserts the shapes and dtypes, and that lse is
    finite exactly where the reference's is. q: (T, Hq, D), k/v: (T, Hkv, D), layout: a SegmentLayout."""
    from moga.kernels.segment_attention import segment_attention_fwd, segment_attention_naive

    q64, k64, v64 = as_double_leaves(q, k, v)
    ref, ref_lse = segment_attention_naive(q64, k64, v64, layout, scale)
    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    with poisoned_outputs():
        out, lse = segment_attention_fwd(q, k, v, layout, scale)
        out_g = segment_attention(qg, kg, vg, layout, scale)
        dout = torch.randn_like(out_g)
        grads = torch.autograd.grad(out_g, (qg, kg, vg), dout)
    assert out.shape == ref.shape
    assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(grads, (q, k, v), strict=True))
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite.to(lse.device))
    errors = {"out": rel_err(out, ref), "out_autograd": rel_err(out_g, ref)}
    errors["lse"] = rel_err(lse[finite], ref_lse[finite])
    errors.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True)})
    return errors


def check_fwd_bwd_against_float64(
    attention: Callable,
    reference: Callable,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tol: float | None = None,
) -> torch.Tensor:
    """Forward and dq/dk/dv of ``attention(q, k, v)`` against ``reference(q64, k64, v64)`` run on float64 copies,
    with the kernels' outputs poisoned (NaN) first. q: (B, N, Hq, D), k/v: (B, N, Hkv, D) leaves that require grad
    (their .grad is filled); both callables return (B, N, Hq, D). One random draw: dout, ``torch.randn_like`` of the
    reference output. Every output and gradient must be finite and within ``tol`` (default ``TOL[q.dtype]``) relative
    error. Returns the output."""
    tol = tol or TOL[q.dtype]
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref = reference(q64, k64, v64)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    with poisoned_outputs():
        out = attention(q, k, v)
        out.backward(dout.to(out.dtype))
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, got, want in (
        ("out", out, ref),
        ("dq", q.grad, q64.grad),
        ("dk", k.grad, k64.grad),
        ("dv", v.grad, v64.grad),
    ):
        assert torch.isfinite(got).all(), f"{name} has non-finite entries (unwritten poison?)"
        err = rel_err(got, want)
        assert err < tol, f"{name}: rel err {err:.2e} >= {tol:.0e}"
    return out


def assert_out_and_grads_close(out, ref, leaves, leaves64, names: tuple[str, ...], tol: float) -> None:
    """``out`` (computed from the leaves ``leaves``) within ``tol`` relative error of the float64 ``ref`` (computed
    from ``leaves64``, their float64 copies), then the gradients: one random draw, ``dout = torch.randn_like(out)``;
    the gradients of ``out`` w.r.t. ``leaves`` and of ``ref`` w.r.t. ``leaves64`` (``dout.double()``), one per name
    of ``names``, within ``tol``."""
    assert rel_err(out, ref) < tol
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_grads = torch.autograd.grad(ref, leaves64, dout.double())
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert rel_err(g, r) < tol, (name, rel_err(g, r))


def bf16_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked attention computed in the inputs' dtype (bfloat16 arithmetic: the 'bf16 PyTorch implementation'
    baseline). q: (B, N, Hq, D), k/v: (B, N, Hkv, D), mask: bool, broadcastable to (B, Hq, N, N), True = attend.
    Returns (B, N, Hq, D)."""
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    s = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
    return (p @ vt).transpose(1, 2)


def assert_bf16_fwd_bwd_within_twice(
    attention: Callable, baseline: Callable, reference: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """bf16 standard for (B, N, H, D) attention: the output and dq/dk/dv of ``attention(q, k, v)`` (run with
    poisoned outputs, bf16 leaves q/k/v) are finite and within twice the float64 error of ``baseline(q, k, v)`` (the
    same attention computed in bf16), both measured against ``reference(q64, k64, v64)`` on float64 copies. Order
    of calls: reference, one random draw (dout, ``torch.randn_like`` of the reference output), baseline, attention."""
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref = reference(q64, k64, v64)
    dout = torch.randn_like(ref)
    base = baseline(q, k, v)
    with poisoned_outputs():
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    got = [out, *torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))]
    base_all = [base, *torch.autograd.grad(base, (q, k, v), dout.to(base.dtype))]
    want = [ref, *torch.autograd.grad(ref, (q64, k64, v64), dout)]
    for name, g, b, w in zip(("out", "dq", "dk", "dv"), got, base_all, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, w) <= 2 * rel_err(b, w), (name, rel_err(g, w), rel_err(b, w))


def assert_weighted_grads_match(
    got: torch.Tensor,
    want: torch.Tensor,
    inputs: tuple[torch.Tensor, ...],
    names: list[str],
    valid: torch.Tensor | None = None,
    tol: float = 1e-5,
) -> None:
    """Gradients of a weighted sum: with one random draw ``w = torch.randn_like(want)``, the gradients of
    ``(got.double() * w).sum()`` and of ``(want * w).sum()`` (``want``: the float64 reference output, built from the
    same leaves) with respect to ``inputs`` are within ``tol`` relative error, one per name of ``names``; where
    ``valid`` ((B, N) bool) is given, each gradient is exactly zero at the padded tokens (``~valid``)."""
    w = torch.randn_like(want)
    grads = torch.autograd.grad((got.double() * w).sum(), inputs)
    refs = torch.autograd.grad((want * w).sum(), inputs)
    for name, g, r in zip(names, grads, refs, strict=True):
        assert rel_err(g, r) < tol, name
        if valid is not None:
            assert torch.equal(g[~valid], torch.zeros_like(g[~valid])), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker: Callable, world: int, args: tuple, out_dir: str, timeout_s: float) -> list:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes (OMP_NUM_THREADS=1) and return what each rank
    pickled to ``out_dir/rank<r>.pkl``. Fails the test when a child does not finish within ``timeout_s``."""
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned children
    ctx = mp.spawn(worker, args=args, nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} spawned ranks did not finish in {timeout_s} s")
    per_rank = []
    for r in range(world):
        with open(os.path.join(out_dir, f"rank{r}.pkl"), "rb") as f:
            per_rank.append(pickle.load(f))
    return per_rank


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh interpreter with ``env`` added to the environment (import-time settings)."""
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def load_bench_script(stem: str) -> types.ModuleType:
    """``bench/<stem>.py`` as a module (bench/ holds scripts, not a package), executed once and cached in
    ``sys.modules`` as ``moga_bench_<stem>`` (dataclasses look their module up there)."""
    name = f"moga_bench_{stem}"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "bench" / f"{stem}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]
