"""``backend="auto"`` by evidence: the committed table of measured backend orders for CUDA inputs.

``auto_table.json`` (next to this module) maps a key ``sm_<major><minor>/<dtype>/d<head dim>/<regime>`` to a list
of backend names, fastest first, as measured by ``moga bench --json`` on that GPU and chosen by
``bench/make_auto_table.py`` from the medians. :func:`moga.backends.select_backend` consults it for CUDA tensors
before ``AUTO_ORDER["cuda"]``: the listed backends are tried first, in the listed order, then the rest of the default
order. A key that is not in the table (or an empty table, as now: no GPU run has been committed yet) leaves the
default order.

The segment regime is the mean number of query positions per segment, a host-known quantity
(``layout.q_index.numel() / layout.num_segments``): ``short`` below 512, ``medium`` below 8192, ``long`` above.
"""

from __future__ import annotations

import json
import os

import torch

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "auto_table.json")
REGIMES = (("short", 512), ("medium", 8192), ("long", None))  # (name, exclusive upper bound of the mean)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def segment_regime(mean_segment_len: float) -> str:
    """The regime name ("short", "medium" or "long") of a mean segment length (query positions per segment)."""
    for name, upper in REGIMES:
        if upper is None or mean_segment_len < upper:
            return name
    raise AssertionError("unreachable")


def table_key(capability: tuple[int, int], dtype: str, head_dim: int, regime: str) -> str:
    """The table key, e.g. ``sm_90/bfloat16/d128/long``."""
    return f"sm_{capability[0]}{capability[1]}/{dtype}/d{head_dim}/{regime}"


def load_table(path: str = TABLE_PATH) -> dict[str, tuple[str, ...]]:
    """The table's entries; empty when the file is absent (e.g. an install without package data).

    Raises ValueError for a malformed file: a broken table must not silently change which kernels run.
    """
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        doc = json.load(f)
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: expected an object with an 'entries' object")
    table = {}
    for key, order in entries.items():
        if not isinstance(order, list) or not order or not all(isinstance(n, str) for n in order):
            raise ValueError(f"{path}: entry {key!r} must be a non-empty list of backend names, got {order!r}")
        table[key] = tuple(order)
    return table


TABLE: dict[str, tuple[str, ...]] = load_table()

# device index -> compute capability, filled on first use (one host query per device per process).
_CAPABILITY: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABILITY:
        _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return _CAPABILITY[index]


def order_for(
    table: dict[str, tuple[str, ...]], capability: tuple[int, int], dtype: torch.dtype, head_dim: int, mean_len: float
) -> tuple[str, ...] | None:
    """The table's backend order for one (capability, dtype, head dim, mean segment length), or None."""
    if dtype not in DTYPE_NAMES:
        return None
    return table.get(table_key(capability, DTYPE_NAMES[dtype], head_dim, segment_regime(mean_len)))


def lookup(q: torch.Tensor, mean_segment_len: float | None) -> tuple[str, ...] | None:
    """The measured backend order for these flattened (T, H, D) inputs, or None (not CUDA, or no entry).

    ``mean_segment_len`` None (no layout known) means one segment of all T tokens. Reads the device's compute
    capability once per device, and only when the table has entries.
    """
    if not TABLE or q.device.type != "cuda":
        return None
    mean = q.shape[0] if mean_segment_len is None else mean_segment_len
    return order_for(TABLE, _capability(q.device), q.dtype, q.shape[-1], mean)
