"""bench/compile_check.py without compiling anything: the ptxas parser and its wgmma notes, the judgement of a row
(spills, shared memory, serialised wgmma on Hopper), the PTX feature flags, the ptxas flag candidates per Triton
version and the JSON records. CPU-only and fast; the real AOT compile is tested in test_bench.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.utils import load_bench_script

cc = load_bench_script("compile_check")

# ptxas -v output of a Triton dk/dv kernel for sm_90a whose wgmma got serialised (the note comes before the
# function's own lines and names the function; layout as printed by ptxas 12.x/13.x).
PTXAS_SERIALISED = """\
ptxas info    : 0 bytes gmem
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function 'dkdv'
ptxas info    : Compiling entry function 'dkdv' for 'sm_90a'
ptxas info    : Function properties for dkdv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 512 bytes smem
ptxas info    : Compile time = 812.100 ms
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""  # noqa: E501


def test_parse_ptxas_attaches_each_note_to_its_function() -> None:
    reports = cc.parse_ptxas(PTXAS_SERIALISED)
    assert set(reports) == {"dkdv", "other"}
    dkdv, other = reports["dkdv"], reports["other"]
    assert (dkdv.arch, dkdv.registers, dkdv.static_smem, dkdv.spill_stores, dkdv.spill_loads) == (
        "sm_90a", 168, 512, 0, 0,
    )  # fmt: skip
    assert len(dkdv.notes) == 1 and dkdv.notes[0].startswith("C7515: wgmma.mma_async instructions are serialized")
    assert other.notes == [] and (other.registers, other.spill_stores, other.spill_loads) == (255, 8, 4)


def _row(arch: str = "sm_90a", **kw) -> object:
    fields = dict(registers=168, spill_bytes=0, stack_frame=0, shared_bytes=1024)
    fields.update(kw)
    return cc.Row("k[bf16,D=128]", arch, **fields)


def test_judge_fails_serialised_wgmma_on_hopper_only() -> None:
    note = cc.parse_ptxas(PTXAS_SERIALISED)["dkdv"].notes[0]
    assert cc.judge(_row(), 90) == []
    problems = cc.judge(_row(notes=[note]), 90)
    assert problems == ["wgmma serialised by ptxas (C7515)"]
    # Another kind of ptxas note is reported, not judged.
    assert cc.judge(_row(notes=["C7777: Potential Performance Loss: something else"]), 90) == []
    # sm_80 has no wgmma: such a note cannot fail an sm_80 row (the judgement is per architecture).
    assert cc.judge(_row("sm_80", notes=[note]), 80) == []


def test_judge_counts_spills_and_shared_memory_together() -> None:
    problems = cc.judge(_row(spill_bytes=48, shared_bytes=228 * 1024), 90)
    assert len(problems) == 2 and "spills 48 bytes" in problems[0] and "shared memory" in problems[1]


def test_ptx_features() -> None:
    plain = ".version 8.7\n.target sm_80\n\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, ...;\n"
    hopper = (
        ".target sm_90a\n\tsetmaxnreg.dec.sync.aligned.u32 40;\n"
        "\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3, %r4}];\n"
        "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd5, %rd6, 1, 1, 1, 0, 1;\n"
    )
    assert cc.ptx_features(plain) == {"uses_wgmma": False, "uses_tma": False, "warp_specialized": False}
    assert cc.ptx_features(hopper) == {"uses_wgmma": True, "uses_tma": True, "warp_specialized": True}
    # wgmma without TMA (our gathered-row kernels): each flag on its own
    only_wgmma = "\twgmma.fence.sync.aligned;\n\twgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 ...;\n"
    assert cc.ptx_features(only_wgmma) == {"uses_wgmma": True, "uses_tma": False, "warp_specialized": False}


def test_ptxas_flag_candidates_cover_both_triton_versions() -> None:
    """Triton 3.8 passes --regAllocOptLevel=2 to ptxas, 3.6 does not: both candidates are tried, the running
    Triton's first (its make_cubin source decides)."""
    import inspect

    from triton.backends.nvidia.compiler import CUDABackend

    sets = cc._ptxas_flag_sets()
    assert sorted(map(tuple, sets)) == [("-lineinfo",), ("-lineinfo", "--regAllocOptLevel=2")]
    expect_first = "regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin)
    assert ("--regAllocOptLevel=2" in sets[0]) == expect_first


def test_json_records(tmp_path: Path) -> None:
    note = cc.parse_ptxas(PTXAS_SERIALISED)["dkdv"].notes[0]
    ok = _row(uses_wgmma=True, uses_tma=False, warp_specialized=False, cubin_matches=True, compile_s=0.5)
    bad = _row(spill_bytes=48, uses_wgmma=True, uses_tma=False, warp_specialized=False, notes=[note])
    bad.problems = cc.judge(bad, 90)
    failed = cc.Row("k[fp32,D=256]", "sm_80", problems=["compile failed: OutOfResources: shared memory"])
    path = tmp_path / "cc.json"
    cc.write_json(str(path), [ok, bad, failed], "3.6.0", 12.34, 2)
    doc = json.loads(path.read_text())
    assert (doc["triton_version"], doc["elapsed_s"], doc["jobs"], doc["failing"]) == ("3.6.0", 12.3, 2, 2)
    r_ok, r_bad, r_failed = doc["rows"]
    required = {
        "name", "arch", "registers", "spill_bytes", "smem_bytes", "status", "uses_wgmma", "uses_tma",
        "warp_specialized", "ptxas_notes", "triton_version",
    }  # fmt: skip
    assert all(required <= set(r) for r in doc["rows"])
    assert r_ok == {
        **r_ok,
        "name": "k[bf16,D=128]", "arch": "sm_90a", "registers": 168, "spill_bytes": 0, "smem_bytes": 1024,
        "status": "ok", "problems": [], "uses_wgmma": True, "uses_tma": False, "warp_specialized": False,
        "ptxas_notes": [], "cubin_matches": True, "triton_version": "3.6.0",
    }  # fmt: skip
    assert r_bad["status"] == "fail" and r_bad["spill_bytes"] == 48 and r_bad["ptxas_notes"] == [note]
    assert len(r_bad["problems"]) == 2 and "C7515" in r_bad["problems"][1]
    assert r_failed["status"] == "fail" and r_failed["registers"] is None and r_failed["uses_wgmma"] is None
    # The earlier format's keys stay readable.
    assert r_ok["kernel"] == r_ok["name"] and r_ok["shared_bytes"] == r_ok["smem_bytes"]


def test_expect_triton_refuses_another_version(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--expect-triton guards a PYTHONPATH that did not take effect: nothing is compiled, exit code 2."""
    # main() drops TRITON_INTERPRET from the environment: restored for the tests after this one.
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    assert cc.main(["--modules", "no_such_module", "--expect-triton", "0.0.0"]) == 2
    assert "expected Triton 0.0.0" in capsys.readouterr().err


def test_table_flags_a_cubin_mismatch_that_the_record_keeps_apart() -> None:
    """A cubin that ptxas here did not reproduce is flagged in the table and in cubin_matches, not mixed into the
    ptxas notes; the table's ptx column names the features used."""
    row = _row(uses_wgmma=True, uses_tma=True, warp_specialized=True, cubin_matches=False)
    table = cc.format_table([row])
    assert "cubin differs" in table and "wgmma,tma,ws" in table
    rec = cc.record(row, "3.8.0")
    assert rec["ptxas_notes"] == [] and rec["cubin_matches"] is False and rec["status"] == "ok"
    assert "cubin differs" not in cc.format_table([_row(cubin_matches=True)])
