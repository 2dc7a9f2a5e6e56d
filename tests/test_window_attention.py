"""Window attention (STGA and per-frame branches) against the dense float64 reference from coordinates."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import moga
from moga._alloc import poisoned_outputs
from moga.window import window_attention, window_attention_ref, window_layout, window_mask_ref
from tests.utils import TOL, as_double_leaves, cpu_backends, qkv, rel_err

# (grid, window, shot_starts, context_frames, B, Hq, Hkv); every N = T*H*W <= 256 (Triton interpreter).
CASES = [
    pytest.param((4, 4, 4), (2, 2, 2), None, 0, 1, 2, 2, id="divides"),
    pytest.param((5, 3, 7), (2, 2, 3), None, 0, 1, 2, 1, id="partial-edges-gqa"),
    pytest.param((7, 3, 5), (3, 2, 2), [3, 4], 2, 2, 2, 2, id="shots-1frame-shot-context-b2"),
    pytest.param((9, 2, 4), (4, 1, 2), [0, 2, 7], 1, 1, 4, 2, id="unequal-shots-context-gqa"),
    pytest.param((6, 4, 5), (1, 4, 5), None, 0, 2, 2, 2, id="per-frame-b2"),
    pytest.param((6, 4, 5), (1, 4, 5), [2, 5], 3, 1, 2, 2, id="per-frame-context-longer-than-shots"),
    pytest.param((3, 5, 5), (8, 9, 9), None, 0, 1, 2, 2, id="one-window-is-dense"),
    pytest.param((1, 1, 1), (1, 1, 1), None, 0, 1, 1, 1, id="single-token"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("grid,window,shots,context,B,Hq,Hkv", CASES)
def test_forward_backward_match_reference(backend, grid, window, shots, context, B, Hq, Hkv):
    N, D = math.prod(grid), 32
    q, k, v = qkv(B, N, Hq, Hkv, D)
    dout = torch.randn(B, N, Hq, D)
    with poisoned_outputs():
        out = window_attention(q, k, v, grid, window, shot_starts=shots, context_frames=context, backend=backend)
        out.backward(dout)
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref = window_attention_ref(q64, k64, v64, grid, window, shots, context)
    ref.backward(dout.double())
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not out.isnan().any()
    assert rel_err(out, ref) < TOL[torch.float32]
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert not got.isnan().any(), name
        assert rel_err(got, want) < TOL[torch.float32], name


@pytest.mark.parametrize("backend", cpu_backends())
def test_float16_and_custom_scale(backend):
    grid, window = (4, 3, 5), (3, 2, 3)
    q, k, v = qkv(1, 60, 2, 2, 32, dtype=torch.float16, requires_grad=False)
    out = window_attention(q, k, v, grid, window, shot_starts=[2], context_frames=1, softmax_scale=0.3, backend=backend)
    ref = window_attention_ref(q, k, v, grid, window, [2], 1, softmax_scale=0.3)
    assert out.dtype == torch.float16
    assert rel_err(out, ref) < TOL[torch.float16]


@pytest.mark.parametrize("backend", cpu_backends())
def test_bfloat16_within_twice_the_error_of_pytorch_bfloat16(backend):
    # (Under the Triton interpreter the kernels upcast bf16 tiles before tl.dot, whose bf16 path is wrong there.)
    grid, window, shots, c = (4, 4, 4), (2, 2, 3), [1], 1
    q, k, v = qkv(2, 64, 2, 2, 32, dtype=torch.bfloat16, requires_grad=False)
    ref = window_attention_ref(q, k, v, grid, window, shots, c)
    mask = window_mask_ref(grid, window, shots, c)
    torch_bf16 = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)
    out = window_attention(q, k, v, grid, window, shot_starts=shots, context_frames=c, backend=backend)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2 * rel_err(torch_bf16, ref)


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic_is_bitwise_reproducible_with_context(backend):
    grid, window = (5, 2, 4), (2, 2, 2)
    q, k, v = qkv(1, 40, 2, 2, 32)
    runs = []
    for _ in range(2):
        out = window_attention(
            q, k, v, grid, window, shot_starts=[2], context_frames=2, backend=backend, deterministic=True
        )
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        runs.append((out, *grads))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_per_frame_window_equals_group_attention_by_frame():
    """Per-frame attention is group attention with the frame index as the group id."""
    grid = (5, 3, 4)
    q, k, v = qkv(2, 60, 2, 2, 8, requires_grad=False)
    frame_ids = torch.arange(5).repeat_interleave(12).expand(2, -1)
    want = moga.group_attention(q, k, v, frame_ids, num_groups=5, backend="torch")
    got = window_attention(q, k, v, grid, (1, 3, 4), backend="torch")
    assert rel_err(got, want) < 1e-6


def test_leading_zero_in_shot_starts_is_optional():
    grid = (6, 2, 2)
    q, k, v = qkv(1, 24, 1, 1, 8, requires_grad=False)
    a = window_attention(q, k, v, grid, (2, 1, 2), shot_starts=[3], context_frames=2, backend="torch")
    b = window_attention(q, k, v, grid, (2, 1, 2), shot_starts=[0, 3], context_frames=2, backend="torch")
    assert torch.equal(a, b)


def test_context_frames_change_only_windows_next_to_other_shots():
    """Context is a real change (the test can fail) and stays inside the same spatial window."""
    grid = (6, 2, 2)
    mask0 = window_mask_ref(grid, (6, 1, 2), [3], 0)
    mask2 = window_mask_ref(grid, (6, 1, 2), [3], 2)
    added = mask2 & ~mask0
    assert added.any()
    t = torch.arange(24) // 4
    row = (torch.arange(24) // 2) % 2
    qi, kj = added.nonzero(as_tuple=True)
    assert torch.equal(row[qi], row[kj])  # same spatial window
    # shot [0, 3) sees frames 3, 4 of the next shot; shot [3, 6) sees frames 1, 2 of the previous shot
    assert set(t[kj][t[qi] < 3].tolist()) == {3, 4}
    assert set(t[kj][t[qi] >= 3].tolist()) == {1, 2}


def test_layout_is_cached_and_flags_repeated_keys():
    q, k, v = qkv(2, 36, 1, 1, 8, requires_grad=False)
    window_attention(q, k, v, (4, 3, 3), (2, 2, 2), shot_starts=[1], context_frames=1, backend="torch")
    hits = window_layout.cache_info().hits
    window_attention(q, k, v, (4, 3, 3), (2, 2, 2), shot_starts=[1], context_frames=1, backend="torch")
    assert window_layout.cache_info().hits == hits + 1
    with_ctx = window_layout((4, 3, 3), (2, 2, 2), (0, 1), 1, q.device, 2).segments
    no_ctx = window_layout((4, 3, 3), (2, 2, 2), (0, 1), 0, q.device, 2).segments
    assert with_ctx.q_unique and not with_ctx.k_unique
    assert no_ctx.q_unique and no_ctx.k_unique
    assert torch.equal(torch.sort(with_ctx.q_index).values, torch.arange(72))


def test_paper_scale_layout_sizes():
    """The vectorised builder handles the paper's 187,200-token grid; key count = tokens + context rows."""
    grid, window, shots, c = (120, 30, 52), (40, 15, 26), (0, 30, 45, 90), 2
    seg = window_layout(grid, window, shots, c, torch.device("cpu"), 1).segments
    HW = 30 * 52
    # shots [0,30) [30,45) [45,90) [90,120): temporal windows 1, 1, 2, 1; context frames per shot 2, 4, 4, 2
    assert seg.q_index.numel() == 187_200
    assert seg.num_segments == 5 * 4
    assert seg.k_index.numel() == 187_200 + HW * (1 * 2 + 1 * 4 + 2 * 4 + 1 * 2)
    assert int(seg.q_offsets[-1]) == 187_200 and int(seg.k_offsets[-1]) == seg.k_index.numel()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(grid=(2, 3, 3)), ValueError, "grid"),
        (dict(grid=(2, 3)), TypeError, "grid"),
        (dict(window=(0, 1, 1)), ValueError, "window"),
        (dict(window=(1.0, 1, 1)), TypeError, "window"),
        (dict(shot_starts=[2, 1]), ValueError, "strictly increasing"),
        (dict(shot_starts=[1, 4]), ValueError, r"\[0, 4\)"),
        (dict(shot_starts=[-1]), ValueError, "shot_starts"),
        (dict(context_frames=-1), ValueError, "context_frames"),
        (dict(context_frames=1.5), TypeError, "context_frames"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    q, k, v = qkv(1, 48, 1, 1, 8, requires_grad=False)
    args = dict(grid=(4, 3, 4), window=(2, 2, 2))
    args.update(kwargs)
    grid, window = args.pop("grid"), args.pop("window")
    with pytest.raises(error, match=match):
        window_attention(q, k, v, grid, window, **args)
