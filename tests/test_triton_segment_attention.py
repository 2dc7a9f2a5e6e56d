"""The fused Triton segment-attention kernels (moga.kernels.segment_attention, backend "triton").

Without a GPU they run under the Triton interpreter (tests/conftest.py); inputs stay small (N <= 512, H <= 4).
Every result is compared with float64 references: the literal ``naive.py`` on the same layout, and the dense
masked references of :mod:`moga.reference` through the public API.
"""

from __future__ import annotations

import pytest
import torch

from moga import _alloc, group_attention, moga_attention
from moga.layout import SegmentLayout, routed_layout
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import (
    TOL,
    as_double_leaves,
    assert_bf16_within_twice_naive,
    assert_out_and_grads_close,
    backend_and_skip_mark,
    qkv,
    ragged_group_ids,
    rel_err,
    segment_errors_vs_naive,
)

triton_backend, pytestmark = backend_and_skip_mark("triton", "triton backend not available")

if triton_backend is not None:
    from moga.kernels.segment_attention import compile_specs
    from moga.kernels.segment_attention.configs import (
        DTYPES,
        HEAD_DIMS,
        MAX_HEAD_DIM,
        MIN_HEAD_DIM,
        config,
        production_config,
    )
    from moga.kernels.segment_attention.tiles import build_tile_table, tile_bound

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tokens(T: int, H: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(T, H, D, dtype=dtype, device=DEVICE)


def _ragged_ids(B: int, N: int, sizes: list[int]) -> torch.Tensor:
    """(B, N) group ids with the given group sizes (shuffled positions), -1 for the rest (padding), on DEVICE."""
    return ragged_group_ids(B, N, sizes, DEVICE)


def _context_layout(T: int, segments: list[tuple[int, int]], context: int) -> SegmentLayout:
    """Contiguous token segments [a, b) whose keys also hold ``context`` rows of the previous segment (a row can
    be a key of two segments: k_unique=False), like the static window branch with context frames."""
    q_index, k_index, q_off, k_off = [], [], [0], [0]
    for s, (a, b) in enumerate(segments):
        q_index += list(range(a, b))
        extra = list(range(max(segments[s - 1][1] - context, segments[s - 1][0]), segments[s - 1][1])) if s else []
        k_index += list(range(a, b)) + extra
        q_off.append(len(q_index))
        k_off.append(len(k_index))
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEVICE)  # noqa: E731
    return SegmentLayout(as_t(q_index), as_t(q_off), as_t(k_index), as_t(k_off), T, q_unique=True, k_unique=False)


def _check_layout(q, k, v, layout: SegmentLayout, scale: float, tol: float) -> None:
    """Forward (out, lse) and token-space gradients of the triton backend vs naive.py in float64, every kernel output
    NaN-poisoned first (tests.utils.segment_errors_vs_naive): each relative error below ``tol``."""
    errors = segment_errors_vs_naive(triton_backend.segment_attention, q, k, v, layout, scale)
    assert all(e < tol for e in errors.values()), errors


# ---------------------------------------------------------------------------------------------------------------
# Tile table


@pytest.mark.parametrize("include_tail", [False, True])
@pytest.mark.parametrize("block", [1, 4, 16])
def test_tile_table_covers_each_position_once(include_tail: bool, block: int) -> None:
    lengths = torch.tensor([0, 5, 1, 16, 0, 33, 4])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    other = offsets * 2 + 1  # arbitrary non-decreasing "other" boundaries
    L = int(offsets[-1]) + 7  # positions after the last segment
    table = build_tile_table(offsets, other, L, block, include_tail)
    assert table.shape == (tile_bound(L, len(lengths) + include_tail, block), 4)
    covered = torch.zeros(L, dtype=torch.int64)
    for start, seg_end, other_start, other_end in table.tolist():
        stop = min(start + block, seg_end)
        covered[start:stop] += 1
        if start < seg_end:  # a real tile lies inside one segment and loops over that segment's range
            s = int(torch.searchsorted(offsets, torch.tensor(start), right=True)) - 1
            if s < len(lengths):
                assert (seg_end, other_start, other_end) == (offsets[s + 1], other[s], other[s + 1])
            else:
                assert (seg_end, other_start, other_end) == (L, other[-1], other[-1])
    expected = torch.ones(L, dtype=torch.int64)
    if not include_tail:
        expected[int(offsets[-1]) :] = 0
    assert torch.equal(covered, expected)


def test_tile_table_without_segments() -> None:
    offsets = torch.zeros(1, dtype=torch.int64)
    assert build_tile_table(offsets, offsets, 0, 16, include_tail=False).abs().sum() == 0
    table = build_tile_table(offsets, offsets, 20, 16, include_tail=True)
    assert table[:, 0].tolist()[:2] == [0, 16] and table[0, 1] == 20


def test_positions_to_tokens_sums_repeated_tokens_in_fixed_order() -> None:
    """Per-position gradient rows -> token rows: the sum over each token's positions, zero for absent tokens,
    bitwise equal across calls (no atomics)."""
    from moga.kernels.segment_attention.reduce import positions_to_tokens

    T, L, H, D = 50, 120, 2, 32
    index = torch.randint(0, T - 5, (L,), device=DEVICE)  # tokens T-5.. never occur
    grad = torch.randn(L, H, D, device=DEVICE)
    with _alloc.poisoned_outputs():
        out = positions_to_tokens(grad, index, T, torch.float32)
    ref = torch.zeros(T, H, D, dtype=torch.float64, device=DEVICE).index_add_(0, index, grad.double())
    assert rel_err(out, ref) < 1e-6 and (out[T - 5 :] == 0).all()
    assert torch.equal(out, positions_to_tokens(grad, index, T, torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# Kernel pair vs naive.py on a segment layout


@pytest.mark.parametrize("D", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_routed_layout_vs_naive(D: int, dtype: torch.dtype) -> None:
    """Ragged, empty and singleton groups, padding tokens, N not a multiple of any block, GQA 4:2."""
    B, N, Hq, Hkv = 2, 150, 4, 2
    ids = torch.stack([_ragged_ids(1, N, [70, 0, 1, 33, 40])[0], _ragged_ids(1, N, [1, 1, 0, 100, 45])[0]])
    layout = routed_layout(ids.view(B, N, 1), 5).segments
    q, k, v = _tokens(B * N, Hq, D, dtype), _tokens(B * N, Hkv, D, dtype), _tokens(B * N, Hkv, D, dtype)
    _check_layout(q, k, v, layout, D**-0.5, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_context_keys_layout_vs_naive(dtype: torch.dtype) -> None:
    """Keys differ from queries (extra context rows, repeated across segments: non-unique k), a segment longer
    than several blocks, a singleton segment, and tokens that are in no segment at all."""
    T, D = 300, 64
    layout = _context_layout(T, [(0, 90), (90, 91), (91, 200), (200, 230), (260, 290)], context=12)
    q, k, v = _tokens(T, 2, D, dtype), _tokens(T, 1, D, dtype), _tokens(T, 1, D, dtype)
    _check_layout(q, k, v, layout, 0.11, TOL[dtype])


def test_non_unique_queries_and_empty_key_segments() -> None:
    """A token queried by two segments (gradients accumulate) and a segment with queries but no keys."""
    T, D = 40, 32
    as_t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEVICE)  # noqa: E731
    layout = SegmentLayout(
        q_index=as_t(list(range(0, 25)) + list(range(10, 30)) + list(range(30, 35)) + [39, 38]),
        q_offsets=as_t([0, 25, 45, 50]),
        k_index=as_t(list(range(0, 20)) + list(range(5, 40))),
        k_offsets=as_t([0, 20, 55, 55]),
        num_tokens=T,
        q_unique=False,
        k_unique=False,
    )
    q, k, v = _tokens(T, 2, D, torch.float32), _tokens(T, 2, D, torch.float32), _tokens(T, 2, D, torch.float32)
    _check_layout(q, k, v, layout, D**-0.5, TOL[torch.float32])


def test_strided_inputs() -> None:
    """q, k, v as views of one packed (T, 3, H, D) tensor (token stride 3*H*D), starting 8 bytes past an aligned
    address (the kernels then work on aligned copies)."""
    T, H, D = 130, 2, 64
    packed = torch.randn(T * 3 * H * D + 2, device=DEVICE)[2:].view(T, 3, H, D)
    q, k, v = packed[:, 0], packed[:, 1], packed[:, 2]
    ids = _ragged_ids(1, T, [60, 50, 20])
    layout = routed_layout(ids.view(1, T, 1), 3).segments
    _check_layout(q, k, v, layout, D**-0.5, TOL[torch.float32])


# ---------------------------------------------------------------------------------------------------------------
# Public API vs the dense float64 references


@pytest.mark.parametrize(
    "dtype,D,Hq,Hkv,sizes",
    [
        (torch.float32, 64, 2, 2, [100, 0, 1, 60, 39]),  # ragged, empty, singleton
        (torch.float32, 32, 4, 1, [200]),  # one group = dense attention, MQA
        (torch.float16, 128, 2, 1, [77, 50, 3, 1]),  # padding tokens (ids -1), GQA
        (torch.float16, 64, 2, 2, [129, 71]),
    ],
)
def test_group_attention_vs_reference(dtype, D, Hq, Hkv, sizes) -> None:
    B, N = 2, 200
    ids = _ragged_ids(B, N, sizes)
    q, k, v = (t.to(DEVICE) for t in qkv(B, N, Hq, Hkv, D, dtype))
    out = group_attention(q, k, v, ids, num_groups=len(sizes), backend="triton")
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref = group_attention_ref(q64, k64, v64, ids)
    assert out.dtype == dtype
    assert_out_and_grads_close(out, ref, (q, k, v), (q64, k64, v64), ("dq", "dk", "dv"), TOL[dtype])


@pytest.mark.parametrize("top_k", [1, 2])
def test_moga_attention_vs_reference(top_k: int) -> None:
    """Routed and gated; top_k=2 puts each token in two segments (non-unique positions). Router-logit grads too."""
    B, N, Hq, Hkv, D, M = 2, 96, 2, 1, 32, 4
    q, k, v = (t.to(DEVICE) for t in qkv(B, N, Hq, Hkv, D))
    logits = (2 * torch.randn(B, N, M, device=DEVICE)).requires_grad_(True)
    out = moga_attention(q, k, v, logits, top_k=top_k, backend="triton")
    leaves64 = as_double_leaves(q, k, v, logits)
    ref = moga_attention_ref(*leaves64, top_k=top_k)
    names = ("dq", "dk", "dv", "dlogits")
    assert_out_and_grads_close(out, ref, (q, k, v, logits), leaves64, names, TOL[torch.float32])


def test_bfloat16_within_twice_a_bf16_torch_implementation() -> None:
    """bf16: error vs float64 at most 2x that of naive.py run in bf16 (forward and gradients)."""
    T, H, D = 160, 2, 64
    ids = _ragged_ids(1, T, [90, 50, 20])
    layout = routed_layout(ids.view(1, T, 1), 3).segments
    q, k, v = (_tokens(T, H, D, torch.bfloat16).requires_grad_(True) for _ in range(3))
    assert_bf16_within_twice_naive(triton_backend.segment_attention, q, k, v, layout, D**-0.5)


# ---------------------------------------------------------------------------------------------------------------
# Every output element written (NaN-poisoned buffers), validation, configurations


@pytest.mark.parametrize("top_k", [1, 2])
def test_poisoned_outputs_and_grads_are_overwritten(top_k: int) -> None:
    B, N, H, D, M = 1, 70, 2, 32, 5
    q, k, v = (t.to(DEVICE) for t in qkv(B, N, H, H, D))
    logits = torch.randn(B, N, M, device=DEVICE)
    logits[0, :, 4] = -1e4  # group 4 stays empty (also for top_k=2 with M=5: at most 4 groups used)
    with _alloc.poisoned_outputs():
        out = moga_attention(q, k, v, logits, top_k=top_k, backend="triton")
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        ids = _ragged_ids(B, N, [30, 1, 20])  # 19 padding tokens: zero output, zero gradient
        out_pad = group_attention(q, k, v, ids, num_groups=3, backend="triton")
        grads_pad = torch.autograd.grad(out_pad.square().sum(), (q, k, v))
    for t in (out, *grads, out_pad, *grads_pad):
        assert not torch.isnan(t).any()
    pad = ids[0] < 0
    assert (out_pad[0, pad] == 0).all() and all((g[0, pad] == 0).all() for g in grads_pad)
    assert all(g[0, ~pad].abs().sum() > 0 for g in grads_pad)


def test_unsupported_inputs_are_refused() -> None:
    probe = torch.zeros(4, 2, 48, device=DEVICE)
    assert triton_backend.unsupported_reason(probe, probe, probe) is None  # any head dim from 1 to 256
    for D in (0, 257, 512):
        wide = torch.zeros(4, 2, D, device=DEVICE)
        reason = triton_backend.unsupported_reason(wide, wide, wide)
        assert f"head dim {D} (supported: any head dim from 1 to 256)" in reason
    probe64 = torch.zeros(4, 2, 64, dtype=torch.float64, device=DEVICE)
    assert "dtype" in triton_backend.unsupported_reason(probe64, probe64, probe64)
    assert triton_backend.unsupported_reason(probe[..., :32], probe[..., :32], probe[..., :32]) is None
    layout = routed_layout(torch.zeros(1, 4, 1, dtype=torch.int64, device=DEVICE), 1).segments
    with pytest.raises(ValueError, match="do not fit q shape"):
        triton_backend.segment_attention(probe[..., :32], probe[:, :1, :16], probe[:, :1, :16], layout, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        triton_backend.segment_attention(probe[..., :32], probe[..., :32].half(), probe[..., :32], layout, 1.0)
    if DEVICE == "cuda":  # a k on another device is named
        assert "k on cpu" in triton_backend.unsupported_reason(probe[..., :32], probe[..., :32].cpu(), probe[..., :32])
    with pytest.raises(ValueError, match="num_tokens=4 but q has 3 token rows"):
        triton_backend.segment_attention(probe[:3, :, :32], probe[:3, :, :32], probe[:3, :, :32], layout, 1.0)
    q = torch.zeros(1, 8, 2, 264, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 264"):
        group_attention(q, q, q, torch.zeros(1, 8, dtype=torch.int64, device=DEVICE), backend="triton")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_compile_specs_list_every_production_config(arch: str) -> None:
    """Each architecture checks exactly one configuration per (kernel, output mode, D, dtype): the one it launches."""
    specs = [s for s in compile_specs() if not s.archs or arch in s.archs]
    names = {s.name for s in specs}
    # fwd, preprocess, 2 dq modes, 2 dk/dv modes x (GQA, MHA); + the gradient reduction per dtype
    assert len(names) == len(specs) == len(HEAD_DIMS) * len(DTYPES) * 8 + len(DTYPES)
    for kernel in ("fwd", "preprocess", "dkdv", "dq"):
        for D in HEAD_DIMS:
            for dtype, t in zip(DTYPES, ("fp16", "bf16", "fp32"), strict=True):
                cfg = production_config(kernel, D, dtype, hopper=arch == "sm_90a")
                label = f"[{t},D={D},BM={cfg.block_m},BN={cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}]"
                assert any(n.startswith(f"segment_attn_{'bwd_' if kernel != 'fwd' else ''}{kernel}") and label in n
                           for n in names), (kernel, D, t, label)  # fmt: skip
    for spec in specs:
        assert set(spec.constexprs) <= set(spec.signature) and spec.signature.keys() == set(spec.fn.arg_names)
    for dtype in DTYPES:  # under the interpreter one small configuration, still a valid tl.dot shape
        cfg = config("fwd", 64, dtype, torch.device(DEVICE))
        assert cfg.block_m >= 16 and cfg.block_n >= 16


def test_backend_and_kernel_tables_agree() -> None:
    """The backend refuses what the kernels cannot run (it keeps its own copy to avoid importing triton)."""
    assert (triton_backend.MIN_HEAD_DIM, triton_backend.MAX_HEAD_DIM) == (MIN_HEAD_DIM, MAX_HEAD_DIM)
    assert triton_backend.DTYPES == DTYPES
