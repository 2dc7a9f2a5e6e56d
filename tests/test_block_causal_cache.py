"""The block-causal STGA / frame layouts (SkyReels-V2 diffusion forcing) are cached like window_layout: built once per
argument tuple, reused by later calls, equal to a fresh build, and keyed by every argument they depend on."""

from __future__ import annotations

import pytest
import torch

from moga.integrations import _block_causal
from moga.integrations._block_causal import (
    block_causal_layer_attention,
    block_causal_window_layout,
    block_of_rows,
    restrict_block_causal,
)
from moga.window import window_layout

CPU = torch.device("cpu")
# grid, window, shot starts, context frames, device, batch, frames per block
BASE = ((4, 2, 3), (2, 1, 2), (0, 2), 1, CPU, 2, 2)


def layout_tensors(layout):
    seg = layout.segments
    return [seg.q_index, seg.q_offsets, seg.k_index, seg.k_offsets, layout.position]


def same_layout(a, b) -> bool:
    flags = [(x.num_tokens, x.q_unique, x.k_unique, x.max_q_len, x.max_k_len) for x in (a.segments, b.segments)]
    return (a.top_k == b.top_k and flags[0] == flags[1] and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(layout_tensors(a), layout_tensors(b), strict=True)
    ))  # fmt: skip


def fresh_build(grid, window, shots, ctx, device, batch, fpb):
    base = window_layout.__wrapped__(grid, window, shots, ctx, device, batch)
    return restrict_block_causal(base, block_of_rows(batch, grid, fpb, device), grid[0] // fpb)


def test_cached_layout_equals_a_fresh_build_and_is_reused():
    block_causal_window_layout.cache_clear()
    first = block_causal_window_layout(*BASE)
    assert same_layout(first, fresh_build(*BASE))
    hits = block_causal_window_layout.cache_info().hits
    assert block_causal_window_layout(*BASE) is first
    assert block_causal_window_layout.cache_info().hits == hits + 1
    assert block_causal_window_layout.cache_info().maxsize is not None  # bounded


@pytest.mark.parametrize(
    "position,value",
    [(0, (4, 3, 2)), (1, (2, 2, 2)), (2, (0,)), (3, 0), (5, 1), (6, 1), (6, 4)],
    ids=["grid", "window", "shots", "context", "batch", "frames_per_block=1", "frames_per_block=4"],
)
def test_every_key_component_changes_the_layout(position, value):
    args = list(BASE)
    args[position] = value
    block_causal_window_layout.cache_clear()  # a miss whatever ran before
    misses = block_causal_window_layout.cache_info().misses
    got = block_causal_window_layout(*args)
    assert block_causal_window_layout.cache_info().misses == misses + 1
    assert same_layout(got, fresh_build(*args))
    assert not same_layout(got, block_causal_window_layout(*BASE))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a second device needs a GPU")
def test_the_device_is_part_of_the_key():
    args = list(BASE)
    args[4] = torch.device("cuda", torch.cuda.current_device())
    got = block_causal_window_layout(*args)
    assert got.position.device.type == "cuda"
    assert block_causal_window_layout(*BASE).position.device.type == "cpu"


def test_second_layer_call_reuses_the_static_layouts(monkeypatch):
    """First call: the routed, STGA and frame layouts are restricted (3 builds); second call: only the routed one
    (it depends on the router's output). Outputs equal to a run that rebuilds every layout."""
    calls = []
    real = _block_causal.restrict_block_causal
    monkeypatch.setattr(_block_causal, "restrict_block_causal", lambda *a: calls.append(1) or real(*a))
    block_causal_window_layout.cache_clear()
    torch.manual_seed(0)
    B, (T, H, W) = 2, (4, 2, 3)
    q, k, v = (torch.randn(B, T * H * W, 2, 16) for _ in range(3))
    logits = torch.randn(B, T * H * W, 3)
    kw = dict(frames_per_block=2, grid=(T, H, W), top_k=2, window=(2, 1, 2), frame_attention=True,
              shot_starts=[2], context_frames=1, backend="torch")  # fmt: skip
    first = block_causal_layer_attention(q, k, v, logits, **kw)
    assert len(calls) == 3
    second = block_causal_layer_attention(q, k, v, logits, **kw)
    assert len(calls) == 4
    assert torch.equal(first, second)
    monkeypatch.setattr(_block_causal, "block_causal_window_layout", block_causal_window_layout.__wrapped__)
    uncached = block_causal_layer_attention(q, k, v, logits, **kw)
    assert len(calls) == 7  # every layout rebuilt
    assert torch.equal(first, uncached)
