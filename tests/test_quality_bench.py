"""bench/quality.py on tiny inputs: its metrics against hand-computable cases, and every method end to end."""

from __future__ import annotations

import pytest
import torch

from tests.utils import load_bench_script


@pytest.fixture(scope="module")
def quality():
    return load_bench_script("quality")


def test_recall_and_oracle(quality):
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2]]], dtype=torch.float64)
    mask = torch.tensor([[True, False, False], [False, False, True], [False, True, True]])
    assert quality.recall(probs, mask) == pytest.approx((0.5 + 0.8 + 0.4) / 3)
    assert quality.oracle_recall(probs, 1 / 3) == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    assert quality.recall(probs, torch.ones(3, 3, dtype=torch.bool)) == pytest.approx(1.0)


def test_all_methods_on_a_tiny_scene(quality):
    grid = (2, 4, 8)
    data = quality.synthetic(grid, sample_seed=0, dim=16, heads=2, head_dim=8, objects=2)
    calib = quality.synthetic(grid, sample_seed=1, dim=16, heads=2, head_dim=8, objects=2)
    methods = quality.methods(data, calib, 0.25, [(grid, (1, 4, 8))], seed=0)
    names = [m[0] for m in methods]
    assert len(methods) == 6 and names[0].startswith("random") and "per head" in names[-1]
    probs = quality.dense_probs(data["q"], data["k"])
    dense = quality._dense(data["q"], data["k"], data["v"])
    for name, mask, out, _ in methods:
        d = float(mask.double().mean())
        assert 0 < d <= 1, name
        r = quality.recall(probs, mask)
        assert 0 < r <= quality.oracle_recall(probs, d) + 1e-9, name  # no mask of that density beats the top keys
        assert out.shape == data["q"].shape and torch.isfinite(out).all(), name
        assert quality.rel_err(out, dense) < 2, name
    window = dict((m[0], m[1]) for m in methods)["static windows (1, 4, 8)"]
    assert float(window.double().mean()) == pytest.approx(0.5)  # per-frame attention over 2 frames
