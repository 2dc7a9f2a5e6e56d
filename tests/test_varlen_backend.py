"""The varlen backend (permute + torch's varlen_attn + zero tail): its composition, tested on the CPU by substitution.

``varlen_backend.varlen_attn_override`` takes a stand-in with varlen_attn's signature: per-segment SDPA in float64
that behaves like FlashAttention where it matters here: rows outside every sequence are left unwritten in the
output *and in dq/dk/dv* (NaN here), the output rows of a sequence without keys are NaN (worst case; FA2 writes
zeros), and it asserts what the real kernel requires (int32 cu_seqlens, segments within max_q/max_k, head dim a
multiple of 8, equal head counts unless ``enable_gqa``). Three signatures stand for torch 2.10 (no ``scale``),
2.11 (``scale``, no ``enable_gqa``) and 2.12+ (both). With ``DTYPES`` widened to float64 the composition must
match the float64 reference to rounding.

A GPU test (skipped without CUDA) runs torch's real varlen_attn against the float64 reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import moga
from moga._determinism import deterministic_mode
from moga.backends import AUTO_ORDER, select_backend, varlen_backend
from moga.layout import SegmentLayout
from moga.reference import group_attention_ref, moga_attention_ref
from moga.window import window_attention_ref
from tests.utils import TOL, as_double_leaves, rel_err

NAN = float("nan")


def _sdpa64(q, k, v, scale):
    """One segment: q (n, Hq, D), k/v (m, Hkv, D) -> (n, Hq, D) float64, kv heads repeated for GQA."""
    rep = q.shape[1] // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=scale)
    return out.transpose(0, 1)


class _FlashLike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale):  # type: ignore[override]
        cq, ck = cu_q.tolist(), cu_k.tolist()
        spans = list(zip(cq[:-1], cq[1:], ck[:-1], ck[1:], strict=True))
        out = torch.full_like(q, NAN)
        for a, b, c, d in spans:
            if b > a and d > c:
                out[a:b] = _sdpa64(q[a:b], k[c:d], v[c:d], scale).to(q.dtype)
        ctx.save_for_backward(q, k, v)
        ctx.spans, ctx.scale = spans, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        dq, dk, dv = (torch.full_like(t, NAN) for t in (q, k, v))  # rows outside every sequence: unwritten
        for a, b, c, d in ctx.spans:
            dq[a:b], dk[c:d], dv[c:d] = 0, 0, 0
            if b > a and d > c:
                with torch.enable_grad():
                    leaves = [t.detach().double().requires_grad_(True) for t in (q[a:b], k[c:d], v[c:d])]
                    grads = torch.autograd.grad(_sdpa64(*leaves, ctx.scale), leaves, dout[a:b].double())
                dq[a:b], dk[c:d], dv[c:d] = (g.to(q.dtype) for g in grads)
        return dq, dk, dv, None, None, None


def _standin(calls: list, q, k, v, cu_q, cu_k, max_q, max_k, scale, enable_gqa):
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and cu_q.numel() == cu_k.numel()
    assert int(cu_q[0]) == 0 and int(cu_k[0]) == 0
    lq, lk = torch.diff(cu_q), torch.diff(cu_k)
    assert (lq >= 0).all() and (lk >= 0).all()
    assert int(cu_q[-1]) <= q.shape[0] and int(cu_k[-1]) <= k.shape[0]
    assert int(lq.max()) <= max_q and int(lk.max()) <= max_k, "a sequence is longer than max_q/max_k"
    assert q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
    assert q.shape[1] == k.shape[1] or enable_gqa, "head counts differ without enable_gqa"
    calls.append({"max_q": max_q, "max_k": max_k, "scale": scale, "enable_gqa": enable_gqa, "Hk": k.shape[1]})
    return _FlashLike.apply(q, k, v, cu_q, cu_k, q.shape[-1] ** -0.5 if scale is None else scale)


def make_standin(flavour: str, calls: list):
    """A varlen_attn stand-in with the signature of torch 2.10 / 2.11 / 2.12+."""
    if flavour == "2.10":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            assert not is_causal and return_aux is None
            return _standin(calls, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, None, False)

    elif flavour == "2.11":

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):  # fmt: skip
            return _standin(calls, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, False)

    else:

        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None):  # fmt: skip
            return _standin(calls, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale, enable_gqa)

    return varlen_attn


FLAVOURS = ["2.10", "2.11", "2.12"]


@pytest.fixture
def calls(monkeypatch, request) -> list:
    """Install the stand-in (flavour from the test's ``flavour`` parameter, default 2.12); returns its call log."""
    log: list = []
    callspec = getattr(request.node, "callspec", None)
    flavour = callspec.params.get("flavour", "2.12") if callspec is not None else "2.12"
    monkeypatch.setattr(varlen_backend, "varlen_attn_override", make_standin(flavour, log))
    return log


@pytest.fixture
def float64_ok(monkeypatch) -> None:
    """Let the composition run float64 inputs (the stand-in computes in float64): rounding-level comparisons."""
    monkeypatch.setattr(varlen_backend, "DTYPES", (torch.float16, torch.bfloat16, torch.float64))


BOUND = {torch.float64: TOL[torch.float64], torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def _leaves(B, N, Hq, Hkv, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, N, h, D, generator=g).to(dtype).requires_grad_(True) for h in (Hq, Hkv, Hkv)]


def _compare(fn, ref_fn, leaves, dtype, extra=()):
    """fn(*leaves) and its gradients vs ref_fn on float64 copies; every element finite and within BOUND."""
    dbl = as_double_leaves(*leaves)
    ref = ref_fn(*dbl)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(dout)
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    for name, got, want in zip(["out", "dq", "dk", "dv", *extra], [out, *[t.grad for t in leaves]],
                               [ref, *[t.grad for t in dbl]], strict=True):  # fmt: skip
        assert got is not None and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite entries (an unwritten row reached the result)"
        if want.norm() == 0:  # e.g. dq when every group is one token: zero up to rounding
            assert got.abs().max() <= (1e-12 if dtype == torch.float64 else 1e-2), f"{name} should be zero"
            continue
        err = rel_err(got, want)
        assert err <= BOUND[dtype], f"{name}: rel err {err:.3e} > {BOUND[dtype]:.1e}"


def _ragged_ids(B, N, G, seed=0):
    """(B, N) ids with ragged, empty (group G-1 unused), single-token (group 0) groups and padding (-1)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, G - 1, (B, N), generator=g)
    ids[:, 0] = 0  # group 0: one token per row
    ids[:, 1] = -1  # padding: tail positions
    ids[:, N // 2] = -1
    return ids[:, torch.randperm(N, generator=g)]


# --- availability and refusal ------------------------------------------------------------------------------------


def test_cpu_without_standin_is_refused_clearly():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: varlen_attn is available")
    assert varlen_backend.varlen_attn_override is None
    assert not varlen_backend.is_available()
    assert "varlen" not in moga.available_backends()
    cpu = torch.zeros(4, 2, 64, dtype=torch.float16)
    assert "CUDA-only" in varlen_backend.unsupported_reason(cpu, cpu, cpu)
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="varlen.*CUDA-only"):
        moga.group_attention(q, q, q, torch.zeros(1, 8, dtype=torch.int64), num_groups=1, backend="varlen")


def test_unsupported_reasons(calls):
    ok = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    assert varlen_backend.unsupported_reason(ok, ok, ok) is None
    f32 = ok.float()
    assert "float16 and bfloat16" in varlen_backend.unsupported_reason(f32, f32, f32)
    big = torch.zeros(4, 2, 264, dtype=torch.float16)
    assert "head dim 264" in varlen_backend.unsupported_reason(big, big, big)


def test_auto_order_on_cuda_starts_with_varlen_and_cuda_is_opt_in():
    assert AUTO_ORDER["cuda"] == ("varlen", "triton", "torch")


# --- composition vs the float64 reference ------------------------------------------------------------------------


RAGGED_CASES = [(f, torch.float64, hkv) for f in FLAVOURS for hkv in (2, 1)] + [
    ("2.12", torch.float16, 1),
    ("2.11", torch.bfloat16, 2),
]


@pytest.mark.parametrize(("flavour", "dtype", "hkv"), RAGGED_CASES)
def test_group_attention_ragged_matches_reference(calls, float64_ok, flavour, dtype, hkv):
    B, N, Hq, D, G = 2, 37, 2, 32, 6
    ids = _ragged_ids(B, N, G)
    leaves = _leaves(B, N, Hq, hkv, D, dtype)
    scale = 0.3 if flavour == "2.10" else None  # 2.10 has no scale argument: folded into q
    _compare(
        lambda q, k, v: moga.group_attention(q, k, v, ids, num_groups=G, softmax_scale=scale, backend="varlen"),
        lambda q, k, v: group_attention_ref(q, k, v, ids, softmax_scale=scale),
        leaves,
        dtype,
    )
    assert calls, "the stand-in was not called"
    native = flavour == "2.12" and hkv != Hq
    assert all(c["enable_gqa"] == native and c["Hk"] == (hkv if native else Hq) for c in calls)
    # Default bounds: the host-known totals (T * top_k positions), no synchronisation.
    assert all(c["max_q"] == B * N and c["max_k"] == B * N for c in calls)


def test_one_segment_and_single_tokens(calls, float64_ok):
    for ids, G in ((torch.zeros(1, 20, dtype=torch.int64), 1), (torch.arange(20).view(1, 20), 20)):
        leaves = _leaves(1, 20, 2, 2, 16, torch.float64)
        _compare(
            lambda q, k, v, ids=ids, G=G: moga.group_attention(q, k, v, ids, num_groups=G, backend="varlen"),
            lambda q, k, v, ids=ids: group_attention_ref(q, k, v, ids),
            leaves,
            torch.float64,
        )


def test_all_padding_gives_zeros_and_zero_grads(calls, float64_ok):
    leaves = _leaves(1, 9, 2, 2, 16, torch.float64)
    ids = torch.full((1, 9), -1)
    out = moga.group_attention(*leaves, ids, num_groups=3, backend="varlen")
    assert out.abs().max() == 0
    out.backward(torch.randn_like(out))
    assert all(t.grad is not None and t.grad.abs().max() == 0 for t in leaves)


@pytest.mark.parametrize("D", [40, 59, 8])
def test_head_dims_not_multiple_of_8_are_padded(calls, float64_ok, D):
    ids = _ragged_ids(1, 24, 4, seed=D)
    leaves = _leaves(1, 24, 2, 1, D, torch.float64, seed=D)
    _compare(
        lambda q, k, v: moga.group_attention(q, k, v, ids, num_groups=4, backend="varlen"),
        lambda q, k, v: group_attention_ref(q, k, v, ids),
        leaves,
        torch.float64,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_window_layout_with_context_frames(calls, float64_ok, dtype):
    """q and k segments differ (context frames are keys of several windows): gathers and the dk/dv scatter."""
    grid, window, shots = (4, 3, 4), (1, 2, 2), [2]
    N = 4 * 3 * 4
    leaves = _leaves(2, N, 2, 1, 16, dtype, seed=3)
    _compare(
        lambda q, k, v: moga.window_attention(
            q, k, v, grid, window, shot_starts=shots, context_frames=1, backend="varlen"
        ),
        lambda q, k, v: window_attention_ref(q, k, v, grid, window, shot_starts=shots, context_frames=1),
        leaves,
        dtype,
    )
    # The window layout's host-known bounds size the launch, not the totals: a window of 4 queries, plus one
    # context frame on each side for the keys.
    assert all(c["max_q"] == 4 and c["max_k"] == 12 for c in calls)


@pytest.mark.parametrize(
    ("grid", "window", "shots", "c"),
    [((4, 3, 4), (1, 2, 2), [2], 1), ((5, 4, 6), (2, 3, 4), [2, 3], 2), ((3, 2, 2), (8, 8, 8), None, 0)],
)
def test_window_layout_bounds_cover_the_longest_segment(grid, window, shots, c):
    from moga.window import normalize_shot_starts, window_layout

    seg = window_layout(grid, window, normalize_shot_starts(shots, grid[0]), c, torch.device("cpu"), 2).segments
    longest_q, longest_k = int(torch.diff(seg.q_offsets).max()), int(torch.diff(seg.k_offsets).max())
    assert longest_q <= seg.max_q_len and longest_k <= seg.max_k_len
    volume = min(window[0], grid[0]) * min(window[1], grid[1]) * min(window[2], grid[2])
    assert seg.max_q_len == volume  # a full window exists in each of these grids: the bound is exact for queries


def test_layout_bounds_are_checked_on_the_device(calls, float64_ok):
    T = 10
    layout = dataclasses.replace(_layout([3, 4], [3, 5], T), max_q_len=3)  # wrong: a query segment of 4
    q = torch.randn(T, 2, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="longer than max_q"):
        varlen_backend.segment_attention(q, q, q, layout, 0.25)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_moga_attention_top2_with_router_gradients(calls, float64_ok, dtype):
    B, N, M = 2, 30, 4
    q, k, v = _leaves(B, N, 4, 2, 32, dtype, seed=5)
    logits = torch.randn(B, N, M, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    logits.requires_grad_(True)
    _compare(
        lambda q, k, v, lg: moga.moga_attention(q, k, v, lg, top_k=2, backend="varlen"),
        lambda q, k, v, lg: moga_attention_ref(q, k, v, lg, top_k=2),
        [q, k, v, logits],
        dtype,
        extra=("dlogits",),
    )


# --- segment_attention directly: tails, keyless segments, bounds, limits ----------------------------------------


def _layout(q_sizes, k_sizes, T, q_tail=0, k_tail=0, seed=0):
    """A layout with the given per-segment query/key counts plus tail positions; random (repeating) token rows."""
    g = torch.Generator().manual_seed(seed)
    Lq, Lk = sum(q_sizes) + q_tail, sum(k_sizes) + k_tail
    off = lambda s: torch.tensor([0, *torch.tensor(s).cumsum(0).tolist()], dtype=torch.int64)  # noqa: E731
    return SegmentLayout(
        q_index=torch.randint(0, T, (Lq,), generator=g),
        q_offsets=off(q_sizes),
        k_index=torch.randint(0, T, (Lk,), generator=g),
        k_offsets=off(k_sizes),
        num_tokens=T,
        q_unique=False,
        k_unique=False,
    )


def _segment_ref(q, k, v, layout, scale):
    """Float64 segment attention straight from the layout (per segment, with index lookups)."""
    out = torch.zeros(layout.q_index.numel(), q.shape[1], q.shape[2], dtype=torch.float64)
    qo, ko = layout.q_offsets.tolist(), layout.k_offsets.tolist()
    for s in range(layout.num_segments):
        a, b, c, d = qo[s], qo[s + 1], ko[s], ko[s + 1]
        if b > a and d > c:
            idx_q, idx_k = layout.q_index[a:b], layout.k_index[c:d]
            out[a:b] = _sdpa64(q[idx_q], k[idx_k], v[idx_k], scale)
    return out


def test_tails_and_keyless_segments_are_zero_with_finite_grads(calls, float64_ok):
    T = 12
    layout = _layout([3, 0, 1, 4, 2], [5, 0, 0, 2, 6], T, q_tail=3, k_tail=2)
    q, k, v = (torch.randn(T, h, 16, dtype=torch.float64, requires_grad=True) for h in (2, 1, 1))
    out = varlen_backend.segment_attention(q, k, v, layout, 0.25)
    ref_leaves = as_double_leaves(q, k, v)
    ref = _segment_ref(*ref_leaves, layout, 0.25)
    assert torch.isfinite(out).all()
    assert out[-3:].abs().max() == 0  # tail
    assert out[3:4].abs().max() == 0  # segment 2 has a query but no key
    assert rel_err(out, ref) <= 1e-12
    dout = torch.randn_like(ref)
    out.backward(dout)
    ref.backward(dout)
    for t, r in zip((q, k, v), ref_leaves, strict=True):
        assert torch.isfinite(t.grad).all()
        assert rel_err(t.grad, r.grad) <= 1e-12


def test_seqlen_bounds_are_passed_and_checked(calls, float64_ok):
    T = 10
    layout = _layout([3, 4], [3, 5], T)
    q, k, v = (torch.randn(T, 2, 16, dtype=torch.float64) for _ in range(3))
    with varlen_backend.seqlen_bounds(max_q=4, max_k=5):
        out = varlen_backend.segment_attention(q, k, v, layout, 0.25)
    assert calls[-1]["max_q"] == 4 and calls[-1]["max_k"] == 5
    assert rel_err(out, _segment_ref(q, k, v, layout, 0.25)) <= 1e-12
    with pytest.raises(RuntimeError, match="longer than max_q"), varlen_backend.seqlen_bounds(max_q=3):
        varlen_backend.segment_attention(q, k, v, layout, 0.25)
    with pytest.raises(ValueError, match="positive int"), varlen_backend.seqlen_bounds(max_q=0):
        pass
    varlen_backend.segment_attention(q, k, v, layout, 0.25)  # outside the context: defaults again
    assert calls[-1]["max_q"] == 7 and calls[-1]["max_k"] == 8


def test_int32_and_grid_limits_are_refused(calls, float64_ok, monkeypatch):
    layout = _layout([3, 4], [3, 5], 10)
    q = torch.randn(10, 2, 16, dtype=torch.float64)
    assert varlen_backend.unsupported_reason(q, q, q, layout) is None
    monkeypatch.setattr(varlen_backend, "INT32_MAX", 8 + 128 * 3 - 1)  # Lk + 128 per sequence (2 + tail)
    with pytest.raises(ValueError, match="int32"):
        varlen_backend.segment_attention(q, q, q, layout, 0.25)
    assert "int32" in varlen_backend.unsupported_reason(q, q, q, layout)
    monkeypatch.setattr(varlen_backend, "INT32_MAX", 8 + 128 * 3)
    varlen_backend.segment_attention(q, q, q, layout, 0.25)
    monkeypatch.setattr(varlen_backend, "MAX_SEQUENCES", 2)
    with pytest.raises(ValueError, match="grid limit"):
        varlen_backend.segment_attention(q, q, q, layout, 0.25)
    assert "grid limit" in varlen_backend.unsupported_reason(q, q, q, layout)


def test_auto_skips_varlen_for_a_layout_beyond_its_limits(calls, float64_ok, monkeypatch):
    monkeypatch.setitem(AUTO_ORDER, "cpu", ("varlen", "torch"))
    monkeypatch.setattr(varlen_backend, "MAX_SEQUENCES", 4)
    q, k, v = _leaves(1, 12, 2, 2, 16, torch.float64)
    ids = _ragged_ids(1, 12, 4)
    out = moga.group_attention(q, k, v, ids, num_groups=3)  # 3 segments + tail fit: varlen
    assert len(calls) == 1
    out = moga.group_attention(q, k, v, ids, num_groups=4)  # 4 + tail do not: auto takes torch
    assert len(calls) == 1
    assert rel_err(out, group_attention_ref(q, k, v, ids)) <= 1e-12
    with pytest.raises(ValueError, match="grid limit"):
        moga.group_attention(q, k, v, ids, num_groups=4, backend="varlen")


# --- deterministic mode ------------------------------------------------------------------------------------------


def test_deterministic_mode_is_refused(calls, float64_ok):
    q, k, v = _leaves(1, 12, 2, 2, 16, torch.float64)
    logits = torch.randn(1, 12, 3)
    with pytest.raises(ValueError, match="deterministic"):
        moga.moga_attention(q, k, v, logits, top_k=2, backend="varlen", deterministic=True)
    flat = q[0].detach()
    with deterministic_mode():
        assert "deterministic" in varlen_backend.unsupported_reason(flat, flat, flat)
    assert varlen_backend.unsupported_reason(flat, flat, flat) is None


def test_deterministic_refusal_follows_torch_global_flag(calls, float64_ok):
    flat = torch.zeros(4, 2, 16, dtype=torch.float64)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert "deterministic" in varlen_backend.unsupported_reason(flat, flat, flat)
    finally:
        torch.use_deterministic_algorithms(previous)


def test_auto_skips_varlen_in_deterministic_mode(calls, float64_ok, monkeypatch):
    monkeypatch.setitem(AUTO_ORDER, "cpu", ("varlen", "torch"))
    q, k, v = _leaves(1, 12, 2, 2, 16, torch.float64)
    flat = q[0].detach()
    assert select_backend("auto", flat, flat, flat) is varlen_backend
    with deterministic_mode():
        assert select_backend("auto", flat, flat, flat).__name__ == "moga.backends.torch_backend"
    # Through the public keyword: auto falls to torch (no error) and matches the reference.
    ids = _ragged_ids(1, 12, 4)
    out = moga.group_attention(q, k, v, ids, num_groups=4, deterministic=True)
    assert rel_err(out, group_attention_ref(q, k, v, ids)) <= 1e-12
    n_calls = len(calls)
    moga.group_attention(q, k, v, ids, num_groups=4, deterministic=True)
    assert len(calls) == n_calls  # the stand-in (varlen) was not used


# --- the real kernel (GPU only) ----------------------------------------------------------------------------------


def _gpu_varlen_vs_torch_backend(attention, reference, leaves, dtype) -> list[torch.Tensor]:
    """``attention(q, k, v, backend=...)`` on fresh copies of the CUDA ``leaves`` (q, k, v in ``dtype``) through the
    varlen and the torch backends, against ``reference(q64, k64, v64)`` on float64 copies (one random draw: dout,
    ``torch.randn_like`` of the reference): the varlen output and dq/dk/dv are finite and within twice the torch
    backend's error (float16: or 1e-3). Returns the varlen [out, dq, dk, dv]."""
    dbl = as_double_leaves(*leaves)
    ref = reference(*dbl)
    dout = torch.randn_like(ref)
    ref.backward(dout)

    def run(backend):
        xs = [t.detach().clone().requires_grad_(True) for t in leaves]
        out = attention(*xs, backend=backend)
        out.backward(dout.to(dtype))
        return [out] + [t.grad for t in xs]

    got, base = run("varlen"), run("torch")
    for name, gv, b, w in zip(["out", "dq", "dk", "dv"], got, base, [ref, *[t.grad for t in dbl]], strict=True):
        assert torch.isfinite(gv).all(), name
        err, torch_err = rel_err(gv, w), rel_err(b, w)
        bound = max(1e-3, 2 * torch_err) if dtype == torch.float16 else 2 * torch_err
        assert err <= bound, f"{name}: rel err {err:.3e}, torch backend {torch_err:.3e}"
    return got


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen_attn is CUDA-only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hkv", [4, 2])
def test_gpu_varlen_matches_reference(dtype, hkv):
    if not varlen_backend.is_available():
        pytest.skip(f"varlen_attn unavailable in torch {torch.__version__}")
    g = torch.Generator().manual_seed(7)
    B, N, Hq, D, M = 2, 700, 4, 64, 5
    leaves = [torch.randn(B, N, h, D, generator=g).to("cuda", dtype).requires_grad_(True) for h in (Hq, hkv, hkv)]
    logits = torch.randn(B, N, M, generator=g).to("cuda")
    _gpu_varlen_vs_torch_backend(
        lambda q, k, v, backend: moga.moga_attention(q, k, v, logits, top_k=2, backend=backend),
        lambda q, k, v: moga_attention_ref(q, k, v, logits, top_k=2),
        leaves,
        dtype,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch's varlen_attn is CUDA-only)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 40])
def test_gpu_varlen_ragged_padded_groups(dtype, D):
    """Empty and single-token groups, padding (tail positions), GQA and a padded head dim on the real kernel
    (N > 128 so that cuDNN, where torch dispatches to it, runs too)."""
    if not varlen_backend.is_available():
        pytest.skip(f"varlen_attn unavailable in torch {torch.__version__}")
    B, N, Hq, Hkv, G = 2, 900, 4, 2, 7
    ids = _ragged_ids(B, N, G, seed=D).cuda()
    g = torch.Generator().manual_seed(D)
    leaves = [torch.randn(B, N, h, D, generator=g).to("cuda", dtype).requires_grad_(True) for h in (Hq, Hkv, Hkv)]
    got = _gpu_varlen_vs_torch_backend(
        lambda q, k, v, backend: moga.group_attention(q, k, v, ids, num_groups=G, backend=backend),
        lambda q, k, v: group_attention_ref(q, k, v, ids),
        leaves,
        dtype,
    )
    padded = (ids < 0)[..., None, None].expand_as(got[0])
    assert got[0][padded].abs().max() == 0 and got[1][padded].abs().max() == 0
