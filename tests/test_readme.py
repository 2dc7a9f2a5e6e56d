"""Every ```python snippet of README.md runs as written, each in a fresh process, offline; its tables render.

A snippet may start with one marker comment that this test recognises (any other ``# readme-test:`` line fails):

* ``# readme-test: torchrun --nproc_per_node=P``: run under ``torch.distributed.run`` with P local processes
  (CPU, gloo); the snippet initialises its own process group.
* ``# readme-test: skip <reason>``: not run; for a snippet that cannot run on a CPU-only test machine at all.
  Keep these few: ``test_skips_are_few`` holds their number.

docs/*.md is not covered: its python blocks are signature listings and multi-GPU / DeepSpeed / yunchang recipes.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "# readme-test:"
MAX_SKIPS = 1
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_TORCHRUN = re.compile(r"torchrun --nproc_per_node=(\d+)")


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # line of the opening fence, 1-based
    code: str

    @property
    def marker(self) -> str | None:
        lines = [ln.strip() for ln in self.code.splitlines() if ln.strip().startswith(MARKER)]
        if len(lines) > 1:
            raise AssertionError(f"{self}: more than one '{MARKER}' line")
        return lines[0][len(MARKER) :].strip() if lines else None

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}"


def python_snippets(path: Path) -> list[Snippet]:
    text = path.read_text()
    return [Snippet(path, text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


SNIPPETS = python_snippets(README)


def _env() -> dict[str, str]:
    # Offline: a snippet that needs the network (a hub download) must fail here, not pass on a lucky machine.
    return dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 4, [str(s) for s in SNIPPETS]


@pytest.mark.parametrize("snippet", SNIPPETS, ids=str)
def test_snippet_runs_as_written(snippet: Snippet, tmp_path: Path):
    marker = snippet.marker
    script = tmp_path / "snippet.py"
    script.write_text(snippet.code)
    if marker is None:
        cmd = [sys.executable, str(script)]
    elif marker.startswith("skip"):
        reason = marker[len("skip") :].strip()
        assert reason, f"{snippet}: a skip marker needs a reason"
        pytest.skip(f"{snippet}: {reason}")
    elif m := _TORCHRUN.fullmatch(marker):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={m.group(1)}"]
        cmd.append(str(script))
    else:
        raise AssertionError(f"{snippet}: unknown marker {marker!r} (known: 'skip <reason>', 'torchrun ...')")
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    output = (res.stdout + res.stderr)[-4000:]
    assert res.returncode == 0, f"{snippet} failed:\n{snippet.code}\n--- output ---\n{output}"


def test_skips_are_few():
    skipped = [str(s) for s in SNIPPETS if (s.marker or "").startswith("skip")]
    assert len(skipped) <= MAX_SKIPS, f"too many skipped README snippets: {skipped}"


def test_tables_are_contiguous():
    """A table row after a blank line starts a new table, and GitHub shows a header-less one as raw pipes:
    every run of '|' lines must open with a header and its '|---|' separator."""
    lines = README.read_text().splitlines()
    in_fence = False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not line.startswith("|"):
            continue
        if i == 0 or not lines[i - 1].startswith("|"):  # first row of a table: its header
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", nxt.strip()), (
                f"README.md:{i + 1}: table rows without a header (a blank line inside a table?): {line[:80]}"
            )


_HOLDS_GROUP = re.compile(r"group\.WORLD|new_group\(|sequence_parallel_group")


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if _TORCHRUN.fullmatch(s.marker or "")], ids=str)
def test_torchrun_snippets_hold_no_group_globally(snippet: Snippet):
    """A process group bound to a module global outlives destroy_process_group(), and gloo's worker thread can then
    drop its last collective's tensors while the interpreter exits, which aborts the rank (a crash CI saw once in
    ~2 runs under load). Such a snippet must do its work in a function."""
    tree = ast.parse(snippet.code)
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            src = ast.get_source_segment(snippet.code, node) or ""
            assert not _HOLDS_GROUP.search(src), f"{snippet}: module-level binding of a process group: {src!r}"
