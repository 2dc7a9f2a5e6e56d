"""``backend="auto"`` by evidence: the committed table, its lookup in select_backend, and bench/make_auto_table.py
on synthetic ``moga bench --json`` files."""

from __future__ import annotations

import json
import types

import pytest
import torch

import moga
from moga.backends import AUTO_ORDER, BACKEND_NAMES, auto_order, auto_table, select_backend
from moga.layout import routed_layout
from tests.utils import load_bench_script


def _fake_cuda(T=4096, H=8, D=128, dtype=torch.bfloat16):
    """Host metadata of a flattened CUDA input (lookup reads device, dtype and shape only)."""
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=dtype, shape=(T, H, D))


def test_regimes_and_keys():
    assert [auto_table.segment_regime(x) for x in (1, 511, 512, 8191, 8192, 1e6)] == [
        "short",
        "short",
        "medium",
        "medium",
        "long",
        "long",
    ]
    assert auto_table.table_key((9, 0), "bfloat16", 128, "long") == "sm_90/bfloat16/d128/long"


def test_committed_table_loads_and_names_known_backends():
    table = auto_table.load_table()
    assert all(set(order) <= set(BACKEND_NAMES) for order in table.values())


def test_load_table_missing_and_malformed(tmp_path):
    assert auto_table.load_table(str(tmp_path / "absent.json")) == {}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": {"sm_90/bfloat16/d128/long": "triton"}}))
    with pytest.raises(ValueError, match="non-empty list"):
        auto_table.load_table(str(bad))


def test_lookup_picks_the_listed_order(monkeypatch):
    table = {"sm_90/bfloat16/d128/long": ("triton", "varlen"), "sm_90/bfloat16/d128/short": ("cuda",)}
    monkeypatch.setattr(auto_table, "TABLE", table)
    monkeypatch.setattr(auto_table, "_capability", lambda device: (9, 0))
    q = _fake_cuda()
    assert auto_table.lookup(q, 20000.0) == ("triton", "varlen")
    assert auto_table.lookup(q, 100.0) == ("cuda",)
    assert auto_table.lookup(q, None) is None  # one segment of 4096: medium, not listed
    assert auto_table.lookup(_fake_cuda(D=64), 20000.0) is None
    # auto_order: the measured order first, then the rest of the default order (no duplicates).
    assert auto_order(q, None) == AUTO_ORDER["cuda"]
    layout = routed_layout(torch.zeros(1, 20000, 1, dtype=torch.int64), 1).segments  # one segment of 20000
    assert auto_order(q, layout) == ("triton", "varlen", "torch")
    monkeypatch.setattr(auto_table, "_capability", lambda device: (8, 0))
    assert auto_order(q, layout) == AUTO_ORDER["cuda"]


def test_empty_table_gives_default_order_without_reading_the_device(monkeypatch):
    monkeypatch.setattr(auto_table, "TABLE", {})

    def no_device(device):
        raise AssertionError("the capability must not be read when the table is empty")

    monkeypatch.setattr(auto_table, "_capability", no_device)
    assert auto_table.lookup(_fake_cuda(), 20000.0) is None
    assert auto_order(_fake_cuda()) == AUTO_ORDER["cuda"]
    cpu = torch.zeros(8, 2, 16)
    assert auto_order(cpu) == AUTO_ORDER["cpu"]


def test_select_backend_follows_the_table(monkeypatch):
    seen = []

    def fake_lookup(q, mean):
        seen.append(mean)
        return ("torch",)

    monkeypatch.setattr(auto_table, "lookup", fake_lookup)
    q = torch.randn(1, 12, 2, 16, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2, 2, 0, 1, 2]])
    assert select_backend("auto", q[0], q[0], q[0]).__name__ == "moga.backends.torch_backend"
    out = moga.group_attention(q, q, q, ids, num_groups=4)  # through the public API: layout passed along
    assert seen[-1] == 12 / 4  # mean query positions per segment (B * M = 4 segments)
    out.sum().backward()


def _bench_doc(device, device_type, rows):
    return {"environment": {"device": device, "device_type": device_type}, "check": [], "results": rows}


def _row(n, m, method, mode, ms, status="ok", head_dim=128, dtype="bfloat16"):
    return {
        "n": n,
        "m": m,
        "distribution": "balanced",
        "heads": 8,
        "head_dim": head_dim,
        "dtype": dtype,
        "method": method,
        "kind": "moga",
        "mode": mode,
        "status": status,
        "median_ms": ms if status == "ok" else None,
    }


def test_make_auto_table_on_synthetic_results(tmp_path, monkeypatch):
    script = load_bench_script("make_auto_table")
    results = tmp_path / "results"
    (results / "h200").mkdir(parents=True)
    rows = [
        # long regime (N / M = 65536): varlen fastest in fwd+bwd in both cases, triton second; fwd differs.
        _row(131072, 2, "group_attention[varlen]", "fwd+bwd", 10.0),
        _row(131072, 2, "group_attention[triton]", "fwd+bwd", 12.0),
        _row(131072, 2, "group_attention[torch]", "fwd+bwd", 30.0),
        _row(131072, 2, "group_attention[varlen]", "fwd", 5.0),
        _row(131072, 2, "group_attention[triton]", "fwd", 4.0),
        _row(262144, 4, "group_attention[varlen]", "fwd+bwd", 20.0),
        _row(262144, 4, "group_attention[triton]", "fwd+bwd", 21.0),
        _row(262144, 4, "group_attention[cuda]", "fwd+bwd", 15.0, status="error"),  # failed: not ranked
        _row(262144, 4, "dense_sdpa", "fwd+bwd", 1.0),  # not a backend
        _row(262144, 4, "recipe[varlen]", "fwd+bwd", 1.0),  # a baseline, not a backend
        # short regime (N / M = 256), fwd only: triton fastest.
        _row(8192, 32, "group_attention[varlen]", "fwd", 2.0),
        _row(8192, 32, "group_attention[triton]", "fwd", 1.0),
    ]
    (results / "h200" / "bench.json").write_text(json.dumps(_bench_doc("NVIDIA H200", "cuda", rows)))
    cpu_rows = [_row(8192, 32, "group_attention[cpu]", "fwd", 1.0)]
    (results / "cpu.json").write_text(json.dumps(_bench_doc("AMD EPYC", "cpu", cpu_rows)))
    (results / "unknown.json").write_text(
        json.dumps(_bench_doc("Mystery GPU", "cuda", [_row(8192, 32, "group_attention[torch]", "fwd", 1.0)]))
    )
    out = tmp_path / "table.json"
    assert script.main([str(results), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["entries"] == {
        "sm_90/bfloat16/d128/long": ["varlen", "triton", "torch"],
        "sm_90/bfloat16/d128/short": ["triton", "varlen"],
    }
    assert len(doc["sources"]) == 1 and doc["sources"][0].endswith("bench.json")
    ev = doc["evidence"]["sm_90/bfloat16/d128/long"]
    assert ev["mode"] == "fwd+bwd" and ev["backends"]["varlen"]["cases"] == 2 and ev["backends"]["torch"]["cases"] == 1
    assert ev["backends"]["triton"]["geomean_ratio"] == pytest.approx((1.2 * 1.05) ** 0.5)
    # The unknown GPU is placed with --capability.
    assert script.main([str(results), "--out", str(out), "--capability", "8.0"]) == 0
    assert json.loads(out.read_text())["entries"]["sm_80/bfloat16/d128/short"] == ["torch"]
    # What the script wrote is what the loader and lookup use.
    table = auto_table.load_table(str(out))
    monkeypatch.setattr(auto_table, "TABLE", table)
    monkeypatch.setattr(auto_table, "_capability", lambda device: (9, 0))
    assert auto_table.lookup(_fake_cuda(), 65536.0) == ("varlen", "triton", "torch")
    assert auto_table.lookup(_fake_cuda(), 256.0) == ("triton", "varlen")
