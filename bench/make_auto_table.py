"""Build moga's ``backend="auto"`` table from measured GPU benchmarks.

Reads every ``moga bench --json`` file under ``bench/results/`` (recursively) that was run on CUDA, takes the
``group_attention[<backend>]`` rows that ran (status ``ok``), and for each key
``sm_<major><minor>/<dtype>/d<head dim>/<segment regime>`` (see :mod:`moga.backends.auto_table`; the regime is
that of the case's mean group size N / M) orders the backends by measured medians:

* per benchmark case (N, M, distribution, heads, head dim, dtype), each backend's median divided by the fastest
  backend's median in that case;
* ``fwd+bwd`` cases when the key has any (training is the main use), else ``fwd``;
* backends ranked by how many of the key's cases they ran (a backend that failed or was skipped in a case ranks
  after those that ran them all), then by the geometric mean of their ratios.

Writes ``python/moga/backends/auto_table.json``: the entries, the result files they came from and, per key, the
ratios behind the order. The compute capability comes from the result's environment (``compute_capability``)
when recorded, else from the GPU's name (table below), else from ``--capability`` (files it cannot place are
reported and skipped).

    python bench/make_auto_table.py                      # bench/results -> python/moga/backends/auto_table.json
    python bench/make_auto_table.py DIR --out PATH --capability 9.0
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections import defaultdict

from moga.backends.auto_table import TABLE_PATH, segment_regime, table_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GPU name fragment -> compute capability, for result files that do not record it (longest fragment wins).
NAME_CAPABILITY = {
    "GH200": (9, 0),
    "H200": (9, 0),
    "H100": (9, 0),
    "H800": (9, 0),
    "H20": (9, 0),
    "GB200": (10, 0),
    "B200": (10, 0),
    "A100": (8, 0),
    "A800": (8, 0),
    "A10": (8, 6),
    "L40": (8, 9),
    "L4": (8, 9),
    "RTX 4090": (8, 9),
}
METHOD = re.compile(r"^group_attention\[(\w+)\]$")
ABOUT = (
    "Backend order for backend='auto' on CUDA, chosen from measured medians of `moga bench --json` runs under "
    "bench/results/ by bench/make_auto_table.py. Keys: sm_<major><minor>/<dtype>/d<head dim>/<segment regime>. "
    "Keys not listed (all of them while 'entries' is empty) use AUTO_ORDER['cuda']."
)


def parse_capability(text: str) -> tuple[int, int] | None:
    """``"9.0"`` -> (9, 0); None when ``text`` is not ``<major>.<minor>``."""
    if not re.fullmatch(r"\d+\.\d+", text):
        return None
    major, minor = text.split(".")
    return int(major), int(minor)


def capability_of(env: dict, override: tuple[int, int] | None) -> tuple[int, int] | None:
    """The result file's compute capability: recorded, else from the device name, else ``override``."""
    cap = env.get("compute_capability")
    if isinstance(cap, (list, tuple)) and len(cap) == 2:
        return int(cap[0]), int(cap[1])
    parsed = parse_capability(cap) if isinstance(cap, str) else None
    if parsed is not None:
        return parsed
    name = str(env.get("device", ""))
    for fragment in sorted(NAME_CAPABILITY, key=len, reverse=True):
        if fragment in name:
            return NAME_CAPABILITY[fragment]
    return override


def collect(paths: list[str], override: tuple[int, int] | None) -> tuple[dict, list[str], list[str]]:
    """(key -> mode -> case -> backend -> median ms, files used, messages about files skipped)."""
    data: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    used, skipped = [], []
    for path in paths:
        try:
            with open(path) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{path}: unreadable ({exc})")
            continue
        if not isinstance(doc, dict) or "results" not in doc:
            skipped.append(f"{path}: not a moga bench --json file")
            continue
        env = doc.get("environment", {})
        if env.get("device_type") != "cuda":
            continue  # CPU runs say nothing about CUDA backends
        cap = capability_of(env, override)
        if cap is None:
            skipped.append(f"{path}: compute capability unknown for device {env.get('device')!r} (use --capability)")
            continue
        n_rows = 0
        for row in doc["results"]:
            m = METHOD.match(str(row.get("method", "")))
            if not m or row.get("status") != "ok" or not row.get("median_ms"):
                continue
            key = table_key(cap, row["dtype"], row["head_dim"], segment_regime(row["n"] / row["m"]))
            case = (row["n"], row["m"], row["distribution"], row["heads"])
            data[key][row["mode"]][case][m.group(1)] = float(row["median_ms"])
            n_rows += 1
        if n_rows:
            used.append(os.path.relpath(path, ROOT))
    return data, used, skipped


def rank(cases: dict) -> tuple[list[str], dict[str, dict]]:
    """Backends of one key, best first, and per backend {cases, geomean_ratio}."""
    ratios: dict[str, list[float]] = defaultdict(list)
    for medians in cases.values():
        best = min(medians.values())
        for backend, ms in medians.items():
            ratios[backend].append(ms / best)
    evidence = {
        b: {"cases": len(r), "geomean_ratio": math.exp(sum(math.log(x) for x in r) / len(r))} for b, r in ratios.items()
    }
    order = sorted(evidence, key=lambda b: (-evidence[b]["cases"], evidence[b]["geomean_ratio"], b))
    return order, evidence


def build_table(paths: list[str], override: tuple[int, int] | None = None) -> tuple[dict, list[str]]:
    """The table document (about, sources, entries, evidence) and messages about skipped files."""
    data, used, skipped = collect(paths, override)
    entries, evidence = {}, {}
    for key in sorted(data):
        mode = "fwd+bwd" if data[key].get("fwd+bwd") else "fwd"
        order, ev = rank(data[key][mode])
        entries[key] = order
        evidence[key] = {"mode": mode, "backends": ev}
    return {"about": ABOUT, "sources": sorted(used), "entries": entries, "evidence": evidence}, skipped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="?", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--out", default=TABLE_PATH)
    p.add_argument("--capability", help="compute capability (e.g. 9.0) for files that do not record one")
    args = p.parse_args(argv)
    override = parse_capability(args.capability) if args.capability else None
    if args.capability and override is None:
        p.error(f"--capability must look like 9.0, got {args.capability!r}")
    paths = sorted(glob.glob(os.path.join(args.results, "**", "*.json"), recursive=True))
    doc, skipped = build_table(paths, override)
    for msg in skipped:
        print(f"skipped {msg}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    print(f"wrote {args.out}: {len(doc['entries'])} entries from {len(doc['sources'])} result file(s)")
    for key, order in doc["entries"].items():
        print(f"  {key}: {' > '.join(order)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
