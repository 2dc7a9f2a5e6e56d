"""bench/gpu_check.sh and bench/tile_sweep.py without a GPU.

gpu_check.sh runs in its dry-run mode (GPU_CHECK_DRY_RUN=1) with a stand-in ``nvidia-smi`` on PATH: every step goes
through the same plan, timeouts and summary as on a lent GPU, but prints the command it would run. The summary must
list every planned step in order, the headline bench before any test, caps that fit the 420 s plan, an rc per step,
a step's failure or hang recorded without stopping the steps after it, and the build targeting the stand-in device's
architecture. tile_sweep.py: its case list, argument parsing and JSON bookkeeping, with a stub in place of the GPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.utils import load_bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
PLAN_SECONDS = 420  # one call must leave room for a second one in a session's 15 device-minutes
STEPS = [
    "env",
    "build",
    "import",
    "ceiling",
    "bench",
    "test_triton",
    "test_cuda",
    "test_large",
    "memcheck",
    "tile_sweep",
    "report",
]
STEP_LINE = re.compile(r"^(\S+)\s+cap=(\d+)\s+limit=(-?\d+)\s+rc=(\S+)\s+(\d+)s\s*(.*)$")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and coreutils timeout"
)

FAKE_NVIDIA_SMI = """#!/bin/sh
case "$*" in
  *compute_cap*noheader*) echo "{cc}" ;;
  *--query-gpu*) echo "name, compute_cap"; echo "NVIDIA H200 (stand-in), {cc}" ;;
  *) echo "stand-in nvidia-smi: NVIDIA H200" ;;
esac
"""


def _run_dry(tmp_path, compute_cap: str = "9.0", **env_extra: str) -> tuple[list[tuple], str, str]:
    """Run gpu_check.sh in dry-run mode; returns (step rows, summary text, log text)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI.format(cc=compute_cap))
    smi.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env["TORCH_CUDA_ARCH_LIST"] = "7.0;7.5;8.0;8.6;9.0+PTX"  # an inherited list gives way to the device's own
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        OUT=str(out),
        GPU_CHECK_DRY_RUN="1",
        PYTHON=sys.executable,
        **env_extra,
    )
    proc = subprocess.run(["bash", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = (out / "summary.txt").read_text()
    log = (out / "gpu_check.log").read_text()
    rows = [m.groups() for m in map(STEP_LINE.match, summary.splitlines()) if m]
    assert len(os.listdir(out)) <= 8, "the device tool returns at most 8 files from $OUT"
    assert "stand-in nvidia-smi" in (out / "env.txt").read_text()
    return rows, summary, log


def test_dry_run_plan_order_budget_and_commands(tmp_path):
    rows, summary, log = _run_dry(tmp_path)
    names = [r[0] for r in rows]
    assert names == STEPS, summary
    assert names.index("bench") < min(i for i, n in enumerate(names) if n.startswith("test_")), "headline first"
    caps = [int(r[1]) for r in rows]
    assert sum(caps) <= PLAN_SECONDS, f"caps add up to {sum(caps)} s"
    plan = re.search(r"total=(\d+) budget=(\d+)", summary)
    assert plan and int(plan.group(1)) == sum(caps) and int(plan.group(2)) <= PLAN_SECONDS
    elastic = {"test_triton", "test_cuda", "test_large", "memcheck", "tile_sweep"}  # get what earlier steps left
    for name, cap, limit, rc, *_ in rows:
        assert rc == "0", f"{name}: rc={rc}"
        assert 0 < int(limit) <= PLAN_SECONDS, name
        assert int(limit) <= int(cap) or name in elastic, f"{name}: limit {limit} over its cap {cap}"
    # each step's command, as it would run on the GPU
    commands = dict(re.findall(r"^\[dry run\] (\S+) would run: (.*)$", log, re.M))
    assert "TORCH_CUDA_ARCH_LIST=9.0a" in commands["build"] and "build_ext --inplace" in commands["build"]
    assert "--n 580000 131072 32768 8192" in commands["bench"] and "--json" in commands["bench"]
    for name in ("test_triton", "test_cuda", "test_large"):
        assert "-m pytest -v" in commands[name], name
    assert "test_triton_segment_attention.py" in commands["test_triton"]
    assert "test_triton" not in commands["test_cuda"] and "test_cuda_backend.py" in commands["test_cuda"]
    assert "tests/test_gpu_large.py" in commands["test_large"]
    assert "--tool memcheck" in commands["memcheck"] and "test_cuda_backend.py" in commands["memcheck"]
    assert "tile_sweep.py" in commands["tile_sweep"]


def test_dry_run_failure_and_hang_are_recorded_and_later_steps_still_run(tmp_path):
    rows, summary, _ = _run_dry(
        tmp_path,
        compute_cap="8.0",
        GPU_CHECK_DRY_FAIL="ceiling:3 test_cuda:1",
        GPU_CHECK_DRY_HANG="bench",
        GPU_CHECK_CAP_bench="3",
        GPU_CHECK_ONLY=" ".join(s for s in STEPS if s != "test_large"),
    )
    by_name = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == STEPS, summary
    assert by_name["ceiling"][3] == "3" and by_name["test_cuda"][3] == "1"
    bench = by_name["bench"]
    assert bench[3] in ("124", "137") and "TIMED OUT" in bench[5] and int(bench[4]) <= 3 + 6
    assert all(by_name[n][3] == "0" for n in ("test_triton", "memcheck", "tile_sweep", "report"))
    assert by_name["test_large"][3] == "-" and "not in GPU_CHECK_ONLY" in by_name["test_large"][5]
    assert "build arch: 8.0 " in summary  # an sm_80 device gets sm_80 code only


def test_steps_cannot_run_out_of_plan_order(tmp_path):
    """The plan check itself: a copy of the script whose bench comes after the tests stops with rc 3."""
    text = open(SCRIPT).read()
    bench = re.search(r"^step bench .*$", text, re.M).group(0)
    moved = text.replace(bench, "").replace("step report bash -c report", f"{bench}\nstep report bash -c report")
    copy = tmp_path / "bench" / "gpu_check.sh"
    copy.parent.mkdir()
    copy.write_text(moved)
    shutil.copy(os.path.join(ROOT, "bench", "gpu_env.sh"), copy.parent)  # the environment it sources
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(copy)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and "out of plan order" in proc.stderr


# ---- bench/gpu_sanitize.sh -----------------------------------------------------------------------------------------

FAKE_SANITIZER = """#!/bin/sh
echo "stand-in sanitizer: $*"
echo "kernels link: $(readlink python/moga/kernels)"
env | grep -E '^(TORCH_CUDA_ARCH_LIST|PYTHONPATH|PYTHONUNBUFFERED|PYTORCH_NO_CUDA_MEMORY_CACHING|TRITON_INTERPRET)='
echo "========= ERROR SUMMARY: 0 errors"
"""


def _run_sanitize(tmp_path, sanitizer: bool, **env_extra: str) -> tuple[int, str]:
    """gpu_sanitize.sh (it has no dry-run mode) copied with the gpu_env.sh it sources into ``tmp_path/bench`` and run
    there (its python/moga/kernels link lands in tmp_path), with a stand-in nvidia-smi (compute capability 9.0) and,
    when ``sanitizer``, a stand-in compute-sanitizer that prints its arguments and environment instead of running the
    tests. Returns (rc, summary text)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    tools = {"nvidia-smi": FAKE_NVIDIA_SMI.format(cc="9.0")}
    if sanitizer:
        tools["compute-sanitizer"] = FAKE_SANITIZER
    for name, text in tools.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "bench").mkdir()
    for name in ("gpu_sanitize.sh", "gpu_env.sh"):
        shutil.copy(os.path.join(ROOT, "bench", name), tmp_path / "bench")
    (tmp_path / "python" / "moga").mkdir(parents=True)
    path = [d for d in os.environ["PATH"].split(os.pathsep) if d and not os.path.exists(f"{d}/compute-sanitizer")]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "SANITIZE_"))}
    env.update(
        PATH=os.pathsep.join([str(bin_dir), *path]),
        CUDA_HOME=str(tmp_path / "no_cuda"),
        OUT=str(tmp_path / "out"),
        PYTHON=sys.executable,
        GPU_CHECK_SKIP_BUILD="1",
        SANITIZE_SECONDS="100",
        TORCH_CUDA_ARCH_LIST="7.0;8.0",  # an inherited list gives way to the device's own
        TRITON_INTERPRET="1",
        **env_extra,
    )
    script = str(tmp_path / "bench" / "gpu_sanitize.sh")
    proc = subprocess.run(["bash", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert not (tmp_path / "python" / "moga" / "kernels").is_symlink(), "the kernels link is removed on exit"
    return proc.returncode, (tmp_path / "out" / "summary.txt").read_text()


def test_gpu_sanitize_environment_and_both_tools(tmp_path):
    rc, summary = _run_sanitize(tmp_path, sanitizer=True)
    assert rc == 0, summary
    assert re.match(r"gpu_sanitize \S+, budget 100s, sanitizer: .*/bin/compute-sanitizer\n", summary), summary
    assert re.search(r"^memcheck +rc=0 .*ERROR SUMMARY: 0 error$", summary, re.M), summary
    assert re.search(r"^racecheck +rc=0 .*ERROR SUMMARY: 0 error$", summary, re.M), summary
    for tool in ("memcheck", "racecheck"):
        log = (tmp_path / "out" / f"{tool}.log").read_text()
        args = re.search(r"^stand-in sanitizer: (.*)$", log, re.M).group(1)
        assert f"--tool {tool} " in args and "-m pytest -v" in args and "tests/test_cuda_backend.py -k" in args
        assert ("--racecheck-report hazard" in args) == (tool == "racecheck")
        assert "kernels link: ../../kernels" in log
        env = dict(re.findall(r"^([A-Z_]+)=(.*)$", log, re.M))
        assert env["TORCH_CUDA_ARCH_LIST"] == "9.0a", "Hopper: the device's own sm_90a alone"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "python")
        assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and env["PYTHONUNBUFFERED"] == "1"
        assert "TRITON_INTERPRET" not in env


def test_gpu_sanitize_arch_override_and_no_sanitizer(tmp_path):
    rc, summary = _run_sanitize(tmp_path / "a", sanitizer=True, GPU_CHECK_ARCH="8.6")
    assert rc == 0 and "TORCH_CUDA_ARCH_LIST=8.6\n" in (tmp_path / "a" / "out" / "memcheck.log").read_text()
    rc, summary = _run_sanitize(tmp_path / "b", sanitizer=False)
    assert rc == 0 and "sanitizer: not found" in summary and "compute-sanitizer not found: nothing to do" in summary
    assert "memcheck" not in summary


# ---- bench/tile_sweep.py -------------------------------------------------------------------------------------------


def test_tile_sweep_cases_cover_production_and_issue_candidates():
    ts = load_bench_script("tile_sweep")
    from moga.kernels.segment_attention.configs import production_config

    cases = ts.build_candidates(hopper=True)
    keys = [(c.kernel, c.head_dim) for c in cases]
    assert {(k, d) for k in ("fwd", "dq", "dkdv") for d in (64, 128)} == set(keys)
    assert keys.index(("fwd", 128)) < keys.index(("fwd", 64)), "D = 128 first"
    for kernel, d in set(keys):
        group = [c for c in cases if (c.kernel, c.head_dim) == (kernel, d)]
        prod = production_config(kernel, d, __import__("torch").bfloat16, hopper=True)
        assert group[0].source == "production" and group[0].tiles == (
            prod.block_m,
            prod.block_n,
            prod.num_warps,
            prod.num_stages,
        )
        assert len({c.tiles for c in group}) == len(group), "no configuration twice"
    tiles = {(c.kernel, c.head_dim, c.tiles) for c in cases}
    assert ("fwd", 128, (128, 64, 8, 5)) in tiles
    assert ("dkdv", 128, (32, 128, 8, 2)) in tiles
    assert ("dq", 128, (128, 64, 8, 3)) in tiles
    extra = ts.parse_extra("dq:64:128,128,8,2")
    assert extra in ts.build_candidates(hopper=False, extra=(extra,))
    for bad in ("dq:64:128,128,8", "bwd:64:1,1,1,1", "dq:x:1,1,1,1"):
        with pytest.raises(Exception, match="--extra"):
            ts.parse_extra(bad)


def test_tile_sweep_json_after_every_row_errors_and_deadline(tmp_path):
    ts = load_bench_script("tile_sweep")
    cases = ts.build_candidates(hopper=True, head_dims=(128,), kernels=("dkdv",))
    cases.append(ts.Candidate("dkdv", 128, 16, 16, 4, 1, "extra"))
    assert len(cases) == 3
    path = str(tmp_path / "sweep.json")
    seen_rows = []
    now = [0.0]

    def measure(c):
        seen_rows.append([r["status"] for r in json.load(open(path))["rows"]])
        now[0] += 10.0
        if c.source == "issue-11":
            raise RuntimeError("out of resource: shared memory\nmore")
        return {"median_ms": 2.0, "tflops": 100.0, "rel_diff": 0.5 if c.source == "extra" else 0.0, "timed": "t"}

    rows = ts.sweep(cases, measure, path, {"device": "stub"}, ts.Problem(1024, 8, 2), clock=lambda: now[0])
    assert seen_rows == [["not run"] * 3, ["ok", "not run", "not run"], ["ok", "error", "not run"]]
    doc = json.load(open(path))
    assert [r["status"] for r in doc["rows"]] == ["ok", "error", "mismatch"] == [r.status for r in rows]
    assert doc["rows"][1]["error"] == "RuntimeError: out of resource: shared memory"
    assert doc["rows"][0]["median_ms"] == 2.0 and doc["problem"]["n"] == 1024
    assert doc["rows"][1]["config"] == {"block_m": 32, "block_n": 128, "num_warps": 8, "num_stages": 2}

    now[0] = 0.0
    late = ts.sweep(cases, measure, None, {}, ts.Problem(1024, 8, 2), max_seconds=15, clock=lambda: now[0])
    assert [r.status for r in late] == ["ok", "error", "not run"]


def test_tile_sweep_cli_list_and_refusals(capsys, tmp_path):
    ts = load_bench_script("tile_sweep")
    assert ts.main(["--list", "--head-dims", "128", "--kernels", "dq"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 2 and listed[1].startswith("dq D=128 BM=128 BN=64 w=8 s=3") and "issue-11" in listed[1]
    with pytest.raises(SystemExit) as exc:
        ts.main(["--list", "--n", "0"])
    assert exc.value.code == 2
    if not __import__("torch").cuda.is_available():
        assert ts.main(["--json", str(tmp_path / "x.json")]) == 2
        assert "needs a CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "x.json").exists()


def test_tile_sweep_gpu_measure_through_the_interpreter(monkeypatch, tmp_path):
    """GpuMeasure's inputs, override use, entry-point calls and reference comparison, run on CPU tensors through the
    Triton interpreter with the timer stubbed (the interpreter runs its own tile config, so every row matches)."""
    torch = pytest.importorskip("torch")
    triton_testing = pytest.importorskip("triton.testing")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the Triton interpreter (CPU machines: tests/conftest.py sets it)")
    ts = load_bench_script("tile_sweep")
    from moga.kernels.segment_attention import configs

    entered = []
    real_override = configs.override

    def recording_override(kernel, head_dim, dtype, cfg):
        entered.append((kernel, head_dim, dtype, cfg))
        return real_override(kernel, head_dim, dtype, cfg)

    monkeypatch.setattr(configs, "override", recording_override)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(triton_testing, "do_bench", lambda fn, **kw: (fn(), 2.0)[1])
    cases = ts.build_candidates(hopper=True, head_dims=(64,), kernels=("fwd", "dkdv"))
    cases.append(ts.Candidate("dkdv", 64, 16, 32, 4, 1, "extra"))
    rows = ts.sweep(
        cases, ts.GpuMeasure(ts.Problem(192, 3, 1), device="cpu"), str(tmp_path / "s.json"), {}, ts.Problem(192, 3, 1)
    )
    assert [r.status for r in rows] == ["ok"] * 3, [r.error for r in rows]
    assert [r.rel_diff_vs_production for r in rows] == [0.0] * 3
    assert rows[0].tflops == pytest.approx(4 * 3 * 64**2 * 64 / 2e-3 / 1e12)  # 3 groups of 64 tokens, 2 ms
    assert rows[1].timed.startswith("segment_attention_bwd")
    assert [(k, d, c.block_m, c.block_n) for k, d, _, c in entered] == [
        (c.kernel, 64, c.block_m, c.block_n) for c in cases
    ]
    assert all(dtype == torch.bfloat16 for _, _, dtype, _ in entered)
