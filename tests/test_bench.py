"""moga bench (group sizes, FLOP counts, the CLI end to end on a tiny CPU config, the failure path) and
bench/compile_check.py (the ptxas parser on captured output, and a real AOT compile of small kernels).
No timings are asserted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moga.bench import runner
from moga.bench.cases import BenchCase, balanced_sizes, group_ids_from_sizes, make_inputs, zipf_sizes
from moga.bench.check import CheckResult
from moga.bench.flops import dense_attention_flops, group_attention_flops

ROOT = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: without the interpreter switch conftest sets for kernel tests."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


# ---------------------------------------------------------------- group sizes


@pytest.mark.parametrize(("n", "m"), [(16, 4), (17, 4), (1000, 7), (580_000, 16), (3, 5)])
def test_balanced_sizes_sum_to_n_and_differ_by_at_most_one(n: int, m: int) -> None:
    sizes = balanced_sizes(n, m)
    assert len(sizes) == m and sum(sizes) == n
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("n", "m"), [(100, 4), (8192, 8), (580_000, 16), (7, 5)])
def test_zipf_sizes_sum_to_n_and_follow_one_over_rank(n: int, m: int) -> None:
    sizes = zipf_sizes(n, m)
    assert len(sizes) == m and sum(sizes) == n
    assert sizes == sorted(sizes, reverse=True)
    harmonic = sum(1 / r for r in range(1, m + 1))
    for g, size in enumerate(sizes):  # n / (H_m * rank), up to rounding by at most one token
        assert abs(size - n / (harmonic * (g + 1))) < 1.0


def test_zipf_hand_example() -> None:
    # 1 : 1/2 : 1/3 of 11 tokens = 6 : 3 : 2 exactly.
    assert zipf_sizes(11, 3) == [6, 3, 2]


def test_group_ids_have_exact_sizes_and_are_permuted() -> None:
    sizes = [500, 0, 300, 1, 199]
    ids = group_ids_from_sizes(sizes, torch.Generator().manual_seed(1))
    assert torch.bincount(ids, minlength=len(sizes)).tolist() == sizes
    assert not torch.equal(ids, torch.sort(ids).values)  # placed at random positions, not in blocks


def test_case_inputs_route_to_the_case_groups() -> None:
    case = BenchCase(n=300, m=6, distribution="zipf", heads=2, head_dim=8, dtype="float32")
    x = make_inputs(case, "cpu")
    assert x.q.shape == (1, 300, 2, 8) and x.router_logits.shape == (1, 300, 6)
    assert torch.equal(x.router_logits.argmax(-1), x.group_ids)
    assert torch.bincount(x.group_ids[0], minlength=6).tolist() == case.sizes


# ---------------------------------------------------------------- FLOPs


def test_flops_hand_example() -> None:
    # Groups of 3, 1 and 0 tokens, D=2, 5 heads: forward 4 * (9 + 1 + 0) * 2 * 5 = 400; with backward 3.5x.
    assert group_attention_flops([3, 1, 0], head_dim=2, heads=5) == 400
    assert group_attention_flops([3, 1, 0], head_dim=2, heads=5, backward=True) == 1400
    assert dense_attention_flops(4, head_dim=2, heads=5) == 4 * 16 * 2 * 5


# ---------------------------------------------------------------- baselines


@pytest.mark.parametrize("sizes", [[150, 0, 97, 1, 52], [300]])  # ragged with empty and singleton; one group
def test_baselines_compute_group_attention(sizes: list[int]) -> None:
    """The recipe and FlexAttention (eager here; the bench compiles it) agree with the float64 reference."""
    from moga.bench.baselines import dense_sdpa, flex_available, make_flex_group_attention, sorted_recipe
    from moga.reference import group_attention_ref
    from tests.utils import rel_err

    ids = group_ids_from_sizes(sizes, torch.Generator().manual_seed(3)).view(1, -1)
    n = ids.shape[1]
    q, k, v = (torch.randn(1, n, 2, 16) for _ in range(3))
    ref = group_attention_ref(q, k, v, ids)
    assert rel_err(sorted_recipe(q, k, v, ids, len(sizes)), ref) < 1e-5
    if len(sizes) == 1:
        assert rel_err(dense_sdpa(q, k, v), ref) < 1e-5
    if flex_available() is None:
        assert rel_err(make_flex_group_attention(compiled=False)(q, k, v, ids), ref) < 1e-5


def test_flex_block_mask_skips_exactly_the_empty_blocks() -> None:
    """Eager FlexAttention ignores block sparsity, so check the block mask itself: a (q block, kv block) pair
    is listed iff some query and key in it share a group, and listed as full iff all of them do."""
    from moga.bench.baselines import flex_available, group_block_mask

    if flex_available() is not None:
        pytest.skip(flex_available())
    bs = 16
    ids = torch.sort(group_ids_from_sizes([150, 0, 97, 1, 52], torch.Generator().manual_seed(4))).values
    nb = (ids.numel() + bs - 1) // bs
    bm = group_block_mask(ids, block_size=bs)

    def listed(num, idx):
        return {(i, int(j)) for i in range(nb) for j in idx[0, 0, i, : int(num[0, 0, i])]}

    partial = listed(bm.kv_num_blocks, bm.kv_indices)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices)
    same = ids[:, None] == ids[None, :]
    for i in range(nb):
        for j in range(nb):
            tile = same[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]
            complete = tile.shape == (bs, bs)
            assert ((i, j) in partial or (i, j) in full) == bool(tile.any()), (i, j)
            assert ((i, j) in full) == bool(complete and tile.all()), (i, j)
    assert not partial & full


# ---------------------------------------------------------------- the CLI


def test_bench_cli_end_to_end_on_cpu(tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [
        sys.executable, "-m", "moga.bench", "--device", "cpu", "--quick", "--n", "64", "96", "--m", "3",
        "--heads", "2", "--head-dim", "16", "--budget", "0.01", "--json", str(out_json), "--plot", str(out_png),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "correctness check" in proc.stdout and "dense_sdpa" in proc.stdout

    doc = json.loads(out_json.read_text())
    assert {"environment", "check", "results"} <= doc.keys()
    assert doc["environment"]["device_type"] == "cpu" and "torch" in doc["environment"]["backends_available"]
    assert doc["check"] and all(c["ok"] for c in doc["check"])
    rows = doc["results"]
    fields = {"n", "m", "distribution", "method", "kind", "mode", "status", "median_ms", "tflops", "flops",
              "speedup_vs_dense", "peak_mem_bytes", "reason"}  # fmt: skip
    assert all(fields <= r.keys() for r in rows)
    methods = {r["method"] for r in rows}
    assert {"dense_sdpa", "group_attention[torch]", "moga_attention[auto]", "recipe[sdpa]"} <= methods
    for r in rows:
        assert r["status"] in ("ok", "skipped", "error")
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["tflops"] > 0 and r["speedup_vs_dense"] > 0
        else:
            assert r["reason"]  # every skip says why
        backward = r["mode"] == "fwd+bwd"
        if r["method"] == "dense_sdpa":
            assert r["flops"] == dense_attention_flops(r["n"], 16, 2, backward)
        else:
            assert r["flops"] == group_attention_flops(balanced_sizes(r["n"], r["m"]), 16, 2, backward)
    assert {(r["n"], r["mode"]) for r in rows if r["method"] == "group_attention[torch]"} == {
        (64, "fwd"),
        (64, "fwd+bwd"),
        (96, "fwd"),
        (96, "fwd+bwd"),
    }
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_fails_loudly_when_the_check_fails(monkeypatch, tmp_path: Path, capsys) -> None:
    bad = [CheckResult("group_attention[torch]", "out", 0.5, 1e-5)]
    monkeypatch.setattr(runner, "run_check", lambda device, dtype, seed: bad)
    from moga.cli import build_parser

    args = build_parser().parse_args(["bench", "--device", "cpu", "--n", "64", "--json", str(tmp_path / "b.json")])
    assert runner.run(args) == 1
    assert "FAILED" in capsys.readouterr().err
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["results"] == [] and doc["check"][0]["ok"] is False


def test_bench_rejects_a_bad_argument() -> None:
    from moga.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--device", "tpu"])


# ---------------------------------------------------------------- compile_check


def _load_compile_check():
    """bench/compile_check.py is a script, not a package module: load it by path (registered, for dataclasses)."""
    name = "moga_bench_compile_check"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "compile_check.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# Captured from Triton 3.8's ptxas (CUDA 12.9) on an attention tile with BM=256, BN=128, D=128, 4 warps.
PTXAS_SPILL_SM90 = """\
ptxas info    : (C7511) Potential Performance Loss: wgmma.mma_async instructions are serialized due to insufficient register resources for the wgmma pipeline in the function 'attn'
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'attn' for 'sm_90a'
ptxas info    : Function properties for attn
    1928 bytes stack frame, 3292 bytes spill stores, 3084 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 1928 bytes cumulative stack size
ptxas info    : Compile time = 1069.641 ms
"""  # noqa: E501
# Captured: a 128x128x64 tl.dot kernel for sm_80 (no spills, constant bank use).
PTXAS_CLEAN_SM80 = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'mm' for 'sm_80'
ptxas info    : Function properties for mm
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 203 registers, used 1 barriers, 392 bytes cmem[0]
ptxas info    : Compile time = 38.250 ms
"""
# Captured: nvcc -Xptxas -v on a CUDA kernel with a static 4 KB __shared__ array.
PTXAS_STATIC_SMEM = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'tile_sum' for 'sm_90a'
ptxas info    : Function properties for tile_sum
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 14 registers, used 1 barriers, 4096 bytes smem
ptxas info    : Compile time = 8.864 ms
"""


def test_parse_ptxas_on_captured_output() -> None:
    cc = _load_compile_check()
    spill = cc.parse_ptxas(PTXAS_SPILL_SM90)["attn"]
    assert (spill.arch, spill.registers, spill.stack_frame) == ("sm_90a", 255, 1928)
    assert (spill.spill_stores, spill.spill_loads, spill.static_smem) == (3292, 3084, 0)
    assert len(spill.notes) == 1 and spill.notes[0].startswith("C7511")
    clean = cc.parse_ptxas(PTXAS_CLEAN_SM80)["mm"]
    assert (clean.arch, clean.registers, clean.spill_stores, clean.spill_loads, clean.static_smem) == (
        "sm_80",
        203,
        0,
        0,
        0,
    )
    smem = cc.parse_ptxas(PTXAS_STATIC_SMEM)["tile_sum"]
    assert (smem.registers, smem.static_smem) == (14, 4096)
    both = cc.parse_ptxas(PTXAS_CLEAN_SM80 + PTXAS_STATIC_SMEM)
    assert set(both) == {"mm", "tile_sum"} and both["mm"].static_smem == 0


def test_judge_flags_spills_and_shared_memory() -> None:
    cc = _load_compile_check()
    assert cc.judge(cc.Row("k", "sm_90a", 128, 0, 0, 227 * 1024), 90) == []
    assert cc.judge(cc.Row("k", "sm_80", 128, 0, 0, 227 * 1024), 80)  # over sm_80's 163 KB
    assert "spills" in cc.judge(cc.Row("k", "sm_90a", 255, 96, 48, 1024), 90)[0]


TINY_KERNELS = """
import triton
import triton.language as tl

from moga.kernels.compile_spec import CompileSpec


@triton.jit
def scale_rows(X, Y, n, BLOCK: tl.constexpr):
    i_b = tl.program_id(0)
    offs = i_b * BLOCK + tl.arange(0, BLOCK)
    # [BLOCK]
    b_x = tl.load(X + offs, mask=offs < n)
    tl.store(Y + offs, b_x * 2, mask=offs < n)


@triton.jit
def big_tile(X, Y, BM: tl.constexpr, D: tl.constexpr):
    rows = tl.arange(0, BM)[:, None] * D + tl.arange(0, D)[None, :]
    # [BM, D] in fp32 registers of 4 warps: far more than 255 registers per thread
    b_x = tl.load(X + rows)
    b_y = tl.dot(b_x, tl.trans(b_x).to(tl.float32))
    tl.store(Y + tl.arange(0, BM)[:, None] * BM + tl.arange(0, BM)[None, :], b_y)


SCALE_SIG = {"X": "*fp32", "Y": "*fp32", "n": "i32", "BLOCK": "constexpr"}
BIG_SIG = {"X": "*fp32", "Y": "*fp32", "BM": "constexpr", "D": "constexpr"}


def compile_specs():
    return [
        CompileSpec("scale_rows[fp32,B=1024]", scale_rows, SCALE_SIG, {"BLOCK": 1024}, num_warps=4, num_stages=1),
        CompileSpec("scale_rows[fp32,B=1024,dup]", scale_rows, SCALE_SIG, {"BLOCK": 1024}, num_warps=4, num_stages=1),
        CompileSpec("big_tile[fp32,BM=256,D=256]", big_tile, BIG_SIG, {"BM": 256, "D": 256}, num_warps=4, num_stages=1),
        # Launched on sm_80 only: a check run for sm_90a must not compile it.
        CompileSpec("scale_rows[fp32,B=512,sm_80]", scale_rows, SCALE_SIG, {"BLOCK": 512}, num_warps=4, num_stages=1,
                    archs=("sm_80",)),
    ]
"""


def test_compile_check_on_small_kernels(tmp_path: Path) -> None:
    """A real AOT compile (no GPU, no interpreter): the clean kernel passes, the spilling one fails the run, and a
    spec restricted to another architecture is not compiled."""
    (tmp_path / "tiny_kernels.py").write_text(textwrap.dedent(TINY_KERNELS))
    out_json = tmp_path / "cc.json"
    cmd = [sys.executable, str(ROOT / "bench" / "compile_check.py"), "--modules", "tiny_kernels",
           "--arch", "sm_90a", "--jobs", "1", "--json", str(out_json)]  # fmt: skip
    env = _clean_env(
        PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), TRITON_INTERPRET="1"
    )  # fmt: skip  (compile_check must drop it itself)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 specs (3 distinct), 2 compiles" in proc.stdout
    rows = {r["kernel"]: r for r in json.loads(out_json.read_text())["rows"]}
    assert set(rows) == {"scale_rows[fp32,B=1024]", "scale_rows[fp32,B=1024,dup]", "big_tile[fp32,BM=256,D=256]"}
    clean = rows["scale_rows[fp32,B=1024]"]
    assert clean["problems"] == [] and 0 < clean["registers"] <= 255 and clean["spill_bytes"] == 0
    assert rows["scale_rows[fp32,B=1024,dup]"]["registers"] == clean["registers"]
    big = rows["big_tile[fp32,BM=256,D=256]"]
    assert big["spill_bytes"] > 0 and any("spills" in p for p in big["problems"])
