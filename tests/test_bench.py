"""moga bench (group sizes, FLOP counts, the CLI end to end on a tiny CPU config, the failure path) and
bench/compile_check.py (the ptxas parser on captured output, and a real AOT compile of small kernels).
No timings are asserted."""

from __future__ import annotations

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
from tests.utils import load_bench_script

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
    # --plot into folders that do not exist yet (issue 14.3: it used to crash after the whole sweep)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "figs" / "new" / "bench.png"
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
            samples = r["samples_ms"]  # every repeat is recorded, with its spread
            assert len(samples) == r["repeats"] >= 3 and all(t > 0 for t in samples)
            assert r["min_ms"] == min(samples) and r["max_ms"] == max(samples)
            assert r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"] <= r["max_ms"]
            assert isinstance(r["noisy"], bool)
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


def _tiny_bench_args(tmp_path: Path, *extra: str):
    from moga.cli import build_parser

    argv = ["bench", "--device", "cpu", "--quick", "--n", "64", "--m", "2", "--heads", "1", "--head-dim", "16",
            "--modes", "fwd", "--budget", "0.001", "--json", str(tmp_path / "b.json"), *extra]  # fmt: skip
    return build_parser().parse_args(argv)


def test_bench_drops_only_the_methods_whose_check_failed(monkeypatch, tmp_path: Path, capsys) -> None:
    bad = [
        CheckResult("group_attention[torch]", "out", 0.5, 1e-5),
        CheckResult("group_attention[torch]", "dq", 1e-7, 1e-5),
        CheckResult("moga_attention[auto,top_k=1]", "out", 1e-7, 1e-5),
    ]
    monkeypatch.setattr(runner, "run_check", lambda device, dtype, seed: bad)
    assert runner.run(_tiny_bench_args(tmp_path)) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.err and "group_attention[torch]" in captured.err and "rel err 5.00e-01" in captured.err
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["check"][0]["ok"] is False and doc["check"][0]["method"] == "group_attention[torch]"
    status = {r["method"]: r["status"] for r in doc["results"]}
    assert status["group_attention[torch]"] == "check_failed"
    assert "correctness check" in next(r["reason"] for r in doc["results"] if r["method"] == "group_attention[torch]")
    # the methods that passed (or that the check does not cover) are still timed
    assert status["dense_sdpa"] == "ok" and status["moga_attention[auto]"] == "ok" and status["recipe[sdpa]"] == "ok"
    assert "check_failed: failed the correctness check" in captured.out  # shown in the table


def test_check_records_an_exception_per_path(monkeypatch) -> None:
    """A path that raises is that path's result; every other path is still checked (and passes)."""
    import moga
    from moga.bench import check
    from moga.bench.check import failed_methods, format_check, run_check

    real = moga.group_attention

    def broken_torch_backend(*args, backend="auto", **kwargs):
        if backend == "torch":
            raise RuntimeError("injected failure\nsecond line")
        return real(*args, backend=backend, **kwargs)

    monkeypatch.setattr(moga, "group_attention", broken_torch_backend)
    # two compiled-free paths are enough here (the interpreted triton path would only cost time)
    monkeypatch.setattr(check, "runnable_backends", lambda q, k, v: {"torch": None, "cpu": None, "triton": "slow"})
    results = run_check(torch.device("cpu"), torch.float32)
    errors = [r for r in results if r.error is not None]
    assert [(r.path, r.tensor, r.error) for r in errors] == [
        ("group_attention[torch]", "error", "RuntimeError: injected failure")
    ]
    others = [r for r in results if r.error is None]
    assert {r.path for r in others} == {
        "group_attention[cpu]",
        "moga_attention[auto,top_k=1]",
        "moga_attention[auto,top_k=2]",
    }
    assert all(r.ok for r in others)
    assert failed_methods(results) == {"group_attention[torch]": "raised RuntimeError: injected failure"}
    assert "NO: raised RuntimeError: injected failure" in format_check(results)
    assert errors[0].as_dict()["ok"] is False


def test_bench_drops_every_moga_method_when_the_check_itself_raises(monkeypatch, tmp_path: Path, capsys) -> None:
    def broken(device, dtype, seed):
        raise ValueError("reference exploded")

    monkeypatch.setattr(runner, "run_check", broken)
    assert runner.run(_tiny_bench_args(tmp_path)) == 1
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["check"][0]["error"] == "ValueError: reference exploded"
    status = {r["method"]: r["status"] for r in doc["results"]}
    assert {status[m] for m in status if m.startswith(("group_attention", "moga_attention"))} == {"check_failed"}
    assert status["dense_sdpa"] == "ok" and status["recipe[sdpa]"] == "ok"


def test_check_result_method_names() -> None:
    assert CheckResult("moga_attention[auto,top_k=2]", "out", 0.0, 1.0).method == "moga_attention[auto]"
    assert CheckResult("group_attention[cpu]", "dq", 0.0, 1.0).method == "group_attention[cpu]"
    assert CheckResult("check", "error", float("nan"), float("nan"), "E: x").method == "check"
    assert not CheckResult("group_attention[cpu]", "out", float("nan"), 1.0).ok  # unwritten element


def test_bench_rejects_an_unknown_method_filter(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="match no method"):
        runner.run(_tiny_bench_args(tmp_path, "--methods", "no_such_method"))


def test_bench_plot_folder_is_created_before_the_sweep(monkeypatch, tmp_path: Path) -> None:
    """--plot into a folder that does not exist: created before any timing (the sweep is stubbed out here)."""
    target = tmp_path / "a" / "b" / "x.png"
    seen = []
    monkeypatch.setattr(runner, "run_check", lambda *a: seen.append(target.parent.is_dir()) or [])
    monkeypatch.setattr(runner, "measure_case", lambda *a, **k: [])
    monkeypatch.setattr(runner, "write_plot", lambda path, rows, env: Path(path).write_bytes(b"png"))
    assert runner.run(_tiny_bench_args(tmp_path, "--plot", str(target))) == 0
    assert seen == [True] and target.read_bytes() == b"png"


def test_bench_unwritable_plot_folder_fails_before_the_sweep(monkeypatch, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        monkeypatch.setattr(runner, "run_check", lambda *a: pytest.fail("the sweep started"))
        with pytest.raises(SystemExit, match="not writable"):
            runner.run(_tiny_bench_args(tmp_path, "--plot", str(locked / "x.png")))
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- timing spread, table, plot


def test_timing_spread_and_noisy_flag() -> None:
    from moga.bench.timing import NOISY_REL_IQR, Timing, quartiles

    steady = Timing(10.0, 5, [10.0, 9.9, 10.1, 10.0, 10.0])
    assert (steady.min_ms, steady.max_ms) == (9.9, 10.1) and not steady.noisy
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 4.0)  # inclusive: hand-checkable
    noisy = Timing(10.0, 5, [5.0, 8.0, 10.0, 14.0, 30.0])
    assert noisy.quartiles_ms == (8.0, 14.0) and noisy.rel_iqr == pytest.approx(0.6) and noisy.noisy
    assert Timing(2.0, 1, [2.0]).rel_iqr == 0.0 and NOISY_REL_IQR == pytest.approx(0.1)


def _row(method: str, mode: str, n: int, ms: float, **kw):
    fields = dict(n=n, m=4, distribution="balanced", heads=2, head_dim=64, dtype="float32", method=method,
                  kind="moga", mode=mode, status="ok", median_ms=ms, repeats=3, samples_ms=[ms * 0.9, ms, ms * 1.1],
                  min_ms=ms * 0.9, max_ms=ms * 1.1, q1_ms=ms * 0.95, q3_ms=ms * 1.05, noisy=False, flops=10**9,
                  tflops=1e-3 / ms, speedup_vs_dense=2.0)  # fmt: skip
    fields.update(kw)
    return runner.Row(**fields)


def test_table_shows_spread_and_flags_noisy_rows() -> None:
    from moga.bench.report import format_table

    rows = [_row("dense_sdpa", "fwd", 64, 4.0), _row("group_attention[torch]", "fwd", 64, 1.0, q1_ms=0.5, q3_ms=2.0,
                                                     noisy=True, min_ms=0.4, max_ms=9.0)]  # fmt: skip
    table = format_table(rows, "note")
    header = next(line for line in table.splitlines() if line.startswith("method"))
    assert all(col in header for col in ("ms", "min", "max", "IQR%"))
    dense, ga = (line for line in table.splitlines() if line.startswith(("dense_sdpa", "group_attention")))
    assert "9.000" in ga and "0.400" in ga and " 150 " in ga and ga.rstrip().endswith("noisy")  # IQR 1.5 / 1.0
    assert not dense.rstrip().endswith("noisy") and "1 row(s) marked noisy" in table


def test_plot_one_colour_per_method_style_per_mode_and_a_speedup_panel() -> None:
    from moga.bench.plot import figure_title, make_figure, method_colors

    names = [f"method_{i}" for i in range(12)]
    colors = method_colors(["dense_sdpa", *names])
    assert len(set(colors.values())) == 13  # 12 methods + dense: no two share a colour
    every = [(i, name, mode, n) for i, name in enumerate(["dense_sdpa", *names]) for mode in ("fwd", "fwd+bwd")
             for n in (64, 128)]  # fmt: skip
    rows = [_row(name, mode, n, 1.0 + i + n / 64) for i, name, mode, n in every]
    env = {"device": "Test CPU", "device_type": "cpu", "torch": "9.9", "date_utc": "2026-12-01T00:00:00+00:00"}
    fig = make_figure(rows, env)
    try:
        ax_t, ax_f, ax_s = fig.axes[:3]
        assert len(fig.axes) == 3 and "speedup" in ax_s.get_ylabel()
        assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1  # one legend, off the data
        by_label: dict[str, set[str]] = {}
        for line in ax_t.get_lines():
            by_label.setdefault(line.get_color(), set()).add(line.get_linestyle())
        assert all(styles == {"-", "--"} for styles in by_label.values())  # fwd and fwd+bwd share the colour
        assert len(by_label) == 13
        assert len(ax_s.get_lines()) == 12 * 2 + 1  # every method but dense, both modes, and the y = 1 line
        title = fig._suptitle.get_text()
        assert title == figure_title(rows, env)
        assert all(part in title for part in ("Test CPU", "float32", "H=2", "D=64", "torch 9.9"))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_bench_rejects_a_bad_argument() -> None:
    from moga.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--device", "tpu"])


# ---------------------------------------------------------------- compile_check


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
    cc = load_bench_script("compile_check")
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
    cc = load_bench_script("compile_check")
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


# ---------------------------------------------------------------- bench/build_log.py (make build's output)


NINJA_LOG = """\
running build_ext
[1/3] c++ -MMD -MF /b/csrc/ops.o.d -O3 -c -c /repo/csrc/ops.cpp -o /b/csrc/ops.o -O3
[2/3] /usr/local/cuda/bin/nvcc --generate-dependencies-with-compile -c -c /repo/csrc/cuda/scan.cu -o /b/scan.o -O3
"""


def test_build_log_summarises_ptxas_and_counts_objects(tmp_path: Path) -> None:
    bl = load_bench_script("build_log")
    log = NINJA_LOG + PTXAS_CLEAN_SM80 + PTXAS_SPILL_SM90 + PTXAS_STATIC_SMEM
    text = bl.summary(log)
    assert text.splitlines()[0] == "compiled 2 object(s)"
    assert "ptxas: 3 kernel(s) (sm_80: 1, sm_90a: 2); most registers 255 (attn, sm_90a); 1 SPILL(S):" in text
    assert "attn on sm_90a: 3292 B spill stores, 3084 B spill loads" in text
    assert "make build PTXAS=1" in text and len(text.splitlines()) == 4  # a summary, not ptxas's raw lines
    assert "tile_sum" in bl.summary(log, table=True)  # the per-kernel table on request
    assert bl.summary("nothing to do\n") == "compiled 0 object(s) (all up to date)"


def test_build_log_runs_a_command_and_keeps_its_output(tmp_path: Path, capsys) -> None:
    bl = load_bench_script("build_log")
    log = tmp_path / "sub" / "build.log"
    script = "print('[1/1] g++ -c -c /x/csrc/a.cpp -o a.o'); print('detail')"
    assert bl.main(["--log", str(log), "--", sys.executable, "-c", script]) == 0
    out = capsys.readouterr().out
    assert "[1/1] " in out and "a.cpp" in out and "detail" not in out and "compiled 1 object(s)" in out
    assert "detail" in log.read_text()
    assert bl.main(["--log", str(log), "--", sys.executable, "-c", "print('boom'); raise SystemExit(3)"]) == 3
    assert "boom" in capsys.readouterr().out  # a failure shows the log's tail
