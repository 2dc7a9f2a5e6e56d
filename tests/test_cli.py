"""The ``moga`` console script (``moga.cli.main``, in process): --version, the help of ``bench`` (method names from
the methods registry, modes) and of ``plan``."""

from __future__ import annotations

import pytest
import torch

import moga
from moga.bench import runner
from moga.bench.methods import Method
from moga.cli import build_parser, main


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"moga {moga.__version__}"


def test_a_subcommand_is_still_required(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2 and "bench,plan" in capsys.readouterr().err


def test_bench_help_lists_the_registry_methods_and_the_modes(capsys) -> None:
    text = _help(capsys, "bench")
    names = runner.method_names(torch.device("cpu"))
    assert {"dense_sdpa", "moga_attention[auto]", "recipe[sdpa]", "group_attention[torch]"} <= set(names)
    for name in names:
        assert name in text
    assert "fwd: forward under no_grad" in text and "fwd+bwd: forward plus backward" in text


def test_bench_help_follows_the_registry(monkeypatch, capsys) -> None:
    """A method added to the registry shows up in --help without touching the CLI."""
    real = runner.methods_for

    def with_extra(case, device, quick):
        return [*real(case, device, quick), Method("recipe[added_later]", "baseline", False, None)]

    monkeypatch.setattr(runner, "methods_for", with_extra)
    assert "recipe[added_later]" in _help(capsys, "bench")


def test_plan_help(capsys) -> None:
    text = _help(capsys, "plan")
    assert all(word in text for word in ("--model", "wan2.1-1.3b", "wan2.1-14b", "mmdit", "--bench-json", "--m"))


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["bench"])
    assert args.modes == ["fwd", "fwd+bwd"] and args.methods is None
