"""moga.plan: token counts, FLOPs against the paper's table and hand examples, the STGA pair count against the
library's own window mask, the bench-JSON prediction and the CLI."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from moga.plan import (
    PAPER_FULL_PFLOPS,
    PAPER_MOGA_PFLOPS,
    PRESET_MOGA,
    PRESETS,
    ModelConfig,
    MoGASettings,
    format_plan,
    frames_for,
    latent_grid,
    paper_check,
    plan,
    stga_pairs,
)
from moga.window import window_mask_ref


def test_paper_video_to_tokens() -> None:
    # 30 s at 16 fps -> 477 frames -> 120 latent frames x 30 x 52 = 187,200 tokens (the paper's figures)
    # the largest 4k+1 not above seconds x fps; a clip of exactly 4k+1 frames (Wan's 81) is given with frames=, the
    # MMDiT preset's 60 s at 24 fps is the paper's 1,441 (= 60 x 24 + 1, not frames_for's 1,437)
    assert frames_for(30, 16) == 477 and frames_for(5, 16) == 77 and frames_for(0.1, 16) == 1
    assert latent_grid(477, 832, 480) == (120, 30, 52)
    assert latent_grid(1441, 832, 480)[0] == 361  # the MMDiT's 60 s at 24 fps
    p = plan("wan2.1-1.3b")
    assert p.tokens == 187_200 and p.frames == 477
    assert plan("mmdit").grid[0] == 361


def test_full_attention_matches_the_paper_within_one_percent() -> None:
    full = plan("wan2.1-1.3b").full_total / 1e15
    assert abs(full / PAPER_FULL_PFLOPS - 1) < 0.01, full


def test_flops_by_hand_on_a_tiny_model() -> None:
    cfg = ModelConfig("tiny", layers=2, hidden=8, heads=2, head_dim=4, ffn=16, text_tokens=3, latent_channels=4)
    s = MoGASettings(num_groups=2, window_frames=1, rows=1, cols=1, frame_attention=True, context_frames=0)
    p = plan(cfg, frames=5, width=32, height=16, moga=s)  # latent (2, 1, 2): N = 4 tokens, 2 per frame
    assert p.grid == (2, 1, 2) and p.tokens == 4
    d, n, L = 8, 4, 2
    linear = L * (2 * n * (4 * d * d + 2 * d * 16 + 2 * d * d) + 2 * 3 * 2 * d * d) + 2 * n * (4 * 4) * d * 2
    assert p.flops["linear"] == linear
    assert p.flops["full_attention"] == L * 4 * n * n * d
    assert p.flops["cross_attention"] == L * 4 * n * 3 * d
    assert p.flops["routed"] == L * 4 * d * (2 * 2 + 2 * 2)  # two balanced groups of 2
    assert p.flops["stga"] == p.flops["frame"] == L * 4 * d * 2 * 2 * 2  # windows = frames: 2 frames of 2x2 pairs
    assert p.flops["router"] == L * 2 * n * d * 2


@pytest.mark.parametrize(
    ("grid", "settings"),
    [
        ((5, 3, 4), MoGASettings(window_frames=2, rows=2, cols=2, shot_starts=(0, 3), context_frames=1)),
        ((7, 4, 5), MoGASettings(window_frames=3, rows=2, cols=3, shot_starts=(0, 2, 5), context_frames=2)),
        ((4, 2, 2), MoGASettings(window_frames=10, rows=1, cols=1)),
    ],
)
def test_stga_pairs_equal_the_library_window_mask(grid, settings: MoGASettings) -> None:
    T, H, W = grid
    window = (settings.window_frames, -(-H // settings.rows), -(-W // settings.cols))
    mask = window_mask_ref(grid, window, list(settings.shot_starts), settings.context_frames)
    assert stga_pairs(grid, settings) == int(mask.sum())


def test_zipf_groups_cost_more_than_balanced() -> None:
    s = PRESET_MOGA["wan2.1-1.3b"]
    balanced = plan("wan2.1-1.3b", moga=s).flops["routed"]
    zipf = plan("wan2.1-1.3b", moga=replace(s, distribution="zipf")).flops["routed"]
    full = plan("wan2.1-1.3b").flops["full_attention"]
    assert balanced == pytest.approx(full / 5, rel=1e-9) and zipf > balanced


def test_paper_moga_rows_are_explained_by_the_stated_fit() -> None:
    pc = paper_check()
    assert abs(pc.full_pflops / PAPER_FULL_PFLOPS - 1) < 0.01
    assert all(abs(r) < 0.01 for r in pc.fit_residuals.values())  # rows = full / M + c, to rounding
    assert pc.fit_constant == pytest.approx(0.87, abs=0.01)
    # ours keeps the linear layers whole: above the paper's rows, falling with M
    assert all(pc.moga_pflops[m] > PAPER_MOGA_PFLOPS[m] for m in PAPER_MOGA_PFLOPS)
    assert pc.moga_pflops[5] > pc.moga_pflops[10] > pc.moga_pflops[20]


def test_memory_figures() -> None:
    p = plan("wan2.1-1.3b", dtype="bfloat16")
    n, d = 187_200, 1536
    assert p.memory_bytes["q_k_v_out"] == 4 * n * d * 2
    assert p.memory_bytes["softmax_stats_fp32"] == 3 * n * 12 * 4  # three branches, one fp32 per token and head
    assert plan("wan2.1-1.3b", dtype="float32").memory_bytes["q_k_v_out"] == 2 * p.memory_bytes["q_k_v_out"]


def test_prediction_from_a_bench_json(tmp_path: Path) -> None:
    def row(method, n, tflops, mode="fwd", status="ok"):
        return {"method": method, "mode": mode, "status": status, "n": n, "tflops": tflops, "heads": 12,
                "head_dim": 128, "dtype": "bfloat16"}  # fmt: skip

    rows = [row("dense_sdpa", 1024, 100.0), row("dense_sdpa", 8192, 400.0), row("dense_sdpa", 16384, 1.0, "fwd+bwd"),
            row("moga_attention[auto]", 8192, 200.0),
            row("moga_attention[auto]", 65536, 9.0, status="error")]  # fmt: skip
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"environment": {"device": "Test GPU"}, "results": rows}))
    p = plan("wan2.1-1.3b", bench_json=str(path))
    f = p.flops
    assert p.predicted_s["full_attention"] == pytest.approx((f["full_attention"] + f["cross_attention"]) / 400e12)
    moga = (f["routed"] + f["stga"] + f["frame"]) / 200e12 + f["cross_attention"] / 400e12
    assert p.predicted_s["moga_attention"] == pytest.approx(moga)
    assert "Test GPU" in p.prediction_note and "predicted attention time" in format_plan(p)
    with pytest.raises(ValueError, match="no successful fwd row"):
        plan("wan2.1-1.3b", bench_json=str(path), bench_method="group_attention[triton]")


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        plan("wan3")
    with pytest.raises(ValueError, match="4k\\+1"):
        plan(frames=80)
    with pytest.raises(ValueError, match="multiples of 16"):
        plan(width=830)
    with pytest.raises(ValueError, match="heads x head_dim"):
        ModelConfig("x", layers=1, hidden=100, heads=3, head_dim=32, ffn=10)
    with pytest.raises(ValueError, match="shot starts"):
        plan(moga=MoGASettings(shot_starts=(0, 500)))


def test_plan_is_exported_and_the_cli_prints_it(tmp_path: Path, capsys) -> None:
    import moga
    from moga.cli import main

    assert moga.plan is importlib.import_module("moga.plan").plan  # moga.plan(...) is the function
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--paper", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "N = 187,200 tokens" in text and "full attention: paper 6.94" in text
    doc = json.loads(out_json.read_text())
    assert doc["tokens"] == 187_200 and abs(doc["full_total"] / 1e15 / 6.94 - 1) < 0.01
    assert main(["plan", "--model", "custom", "--layers", "2", "--hidden", "64", "--heads", "2", "--head-dim", "32",
                 "--ffn", "128", "--seconds", "1", "--fps", "8", "--m", "3", "--split", "1x1", "--shots", "0", "1",
                 "--resolution", "64x32"]) == 0  # fmt: skip
    assert "N = 16 tokens" in capsys.readouterr().out  # 1 s x 8 fps -> 5 frames -> 2 latent frames of 2 x 4
    with pytest.raises(SystemExit, match="needs --layers"):
        main(["plan", "--model", "custom"])


# The CLI is a thin wrapper over plan(): same defaults, same frame rule (the preset's own frame count only when the
# video asked for is the preset's; else frames_for), same refusals.


def _cli(argv: list[str], tmp_path: Path, capsys) -> tuple[str, dict, Path]:
    from moga.cli import main

    path = tmp_path / "plan.json"
    assert main(["plan", *argv, "--json", str(path)]) == 0
    return capsys.readouterr().out, json.loads(path.read_text()), path


def _as_json(p) -> dict:
    return json.loads(json.dumps(p.as_dict()))  # tuples -> lists, as the CLI's file has them


@pytest.mark.parametrize("preset", list(PRESETS))
def test_cli_equals_plan_for_each_preset(preset: str, tmp_path: Path, capsys) -> None:
    out, doc, path = _cli(["--model", preset], tmp_path, capsys)
    p = plan(preset)
    assert doc == _as_json(p)
    assert out == f"{format_plan(p)}\nwrote {path}\n"


@pytest.mark.parametrize(
    ("preset", "video", "kwargs", "frames"),
    [
        ("mmdit", [], {}, 1441),  # the paper's 1,441 frames
        ("mmdit", ["--seconds", "60", "--fps", "24"], {"seconds": 60, "fps": 24}, 1441),  # the preset's, spelled out
        ("mmdit", ["--fps", "24"], {"fps": 24}, 1441),
        ("mmdit", ["--seconds", "30"], {"seconds": 30}, 717),  # 720 -> 717
        ("mmdit", ["--fps", "16"], {"fps": 16}, 957),  # 60 x 16 = 960 -> 957
        ("wan2.1-14b", ["--seconds", "5", "--fps", "16"], {"seconds": 5, "fps": 16}, 77),
        ("mmdit", ["--frames", "81"], {"frames": 81}, 81),
        ("wan2.1-1.3b", ["--frames", "81", "--seconds", "60"], {"frames": 81, "seconds": 60}, 81),  # frames wins
    ],
)
def test_cli_equals_plan_for_a_video(preset, video, kwargs, frames: int, tmp_path: Path, capsys) -> None:
    _, doc, _ = _cli(["--model", preset, *video], tmp_path, capsys)
    p = plan(preset, **kwargs)
    assert p.frames == frames and doc == _as_json(p)
    # a preset with changed dims keeps the preset's video and MoGA defaults, in the CLI and in plan()
    _, changed, _ = _cli(["--model", preset, "--layers", "20", *video], tmp_path, capsys)
    cfg = replace(PRESETS[preset], name=changed["model"]["name"], layers=20)
    assert changed["frames"] == frames and changed["moga"] == doc["moga"]
    assert changed == _as_json(plan(cfg, **kwargs))


@pytest.mark.parametrize(
    ("video", "kwargs", "match"),
    [
        (["--frames", "80"], {"frames": 80}, r"frames must be 4k\+1"),
        (["--frames", "-3"], {"frames": -3}, r"frames must be 4k\+1"),
        (["--seconds", "-1"], {"seconds": -1}, "seconds must be a positive number"),
        (["--seconds", "0"], {"seconds": 0}, "seconds must be a positive number"),  # not "the preset's 30 s"
        (["--seconds", "-30", "--fps", "-16"], {"seconds": -30, "fps": -16}, "seconds must be a positive number"),
        (["--fps", "nan"], {"fps": float("nan")}, "fps must be a positive number"),
        (["--frames", "81", "--fps", "-1"], {"frames": 81, "fps": -1}, "fps must be a positive number"),
    ],
)
def test_cli_and_plan_refuse_a_bad_video(video, kwargs, match: str) -> None:
    from moga.cli import main

    for model in ("mmdit", "wan2.1-1.3b"):
        with pytest.raises(SystemExit, match=f"moga plan: {match}"):
            main(["plan", "--model", model, *video])
        with pytest.raises(SystemExit, match=f"moga plan: {match}"):
            main(["plan", "--model", model, "--layers", "20", *video])
        with pytest.raises(ValueError, match=match):
            plan(model, **kwargs)
