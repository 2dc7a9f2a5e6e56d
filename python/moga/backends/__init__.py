"""Backend registry.

A backend is a module ``moga.backends.<name>_backend`` with:

* ``is_available() -> bool``: whether this installation can run it at all;
* ``unsupported_reason(q, k, v) -> str | None``: why it cannot run these (flattened (T, H, D)) inputs, from
  host metadata only (device, dtype, head dim), or None when it can;
* ``segment_attention(q, k, v, layout, softmax_scale) -> Tensor``: the differentiable segment-attention
  primitive (see :mod:`moga.layout`): q (T, Hq, D), k and v (T, Hkv, D) ->
  out (Lq, Hq, D) in segment order, zero rows for positions outside every segment.

``"auto"`` picks the first runnable of ``AUTO_ORDER[device type]``; for CUDA inputs the measured order of the
committed table :mod:`moga.backends.auto_table` (per compute capability, dtype, head dim and segment-size regime)
comes first where it has an entry. Until a GPU run is committed the table is empty and the default order is
``varlen`` (PyTorch's own varlen kernel), ``triton``, ``torch``; the hand-written ``cuda`` backend is opt-in (by
name). An explicitly named backend that cannot run the inputs raises; there is no silent fallback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from moga.backends import auto_table
from moga.layout import SegmentLayout

BACKEND_NAMES = ("varlen", "cuda", "triton", "triton_tma", "cpu", "torch", "flash_attn", "xformers")
AUTO_ORDER = {"cuda": ("varlen", "triton", "torch"), "cpu": ("cpu", "torch")}

_MODULES = {
    "varlen": "moga.backends.varlen_backend",
    "cuda": "moga.backends.cuda_backend",
    "triton": "moga.backends.triton_backend",
    "triton_tma": "moga.backends.triton_tma_backend",
    "cpu": "moga.backends.cpu_backend",
    "torch": "moga.backends.torch_backend",
    "flash_attn": "moga.backends.flash_attn_backend",
    "xformers": "moga.backends.xformers_backend",
}


# name -> imported module (or None when it cannot import), filled for every backend at the end of this module (our
# backend modules import in about a millisecond; third-party packages load lazily inside them). A dict lookup keeps
# importlib out of traced code: torch.compile cannot trace it (fullgraph=True fails, otherwise a graph break).
_LOADED: dict[str, ModuleType | None] = {}


def get_backend(name: str) -> ModuleType | None:
    """The backend module, or None when its module is missing or cannot import."""
    if name not in _MODULES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    if name not in _LOADED:
        try:
            _LOADED[name] = importlib.import_module(_MODULES[name])
        except ImportError:
            _LOADED[name] = None
    return _LOADED[name]


def available_backends() -> list[str]:
    """Backends this installation can run (on some device), in preference order."""
    names = []
    for name in BACKEND_NAMES:
        mod = get_backend(name)
        if mod is not None and mod.is_available():
            names.append(name)
    return names


def auto_order(q: torch.Tensor, layout: SegmentLayout | None = None) -> tuple[str, ...]:
    """The order ``"auto"`` tries for these flattened (T, H, D) inputs: the committed table's measured order for
    CUDA inputs where it has an entry (then the rest of the default order), else ``AUTO_ORDER[device type]``.

    ``layout`` gives the segment-size regime (mean query positions per segment, host-known); without it the
    inputs count as one segment.
    """
    default = AUTO_ORDER.get(q.device.type, ("torch",))
    mean = None
    if layout is not None:
        mean = layout.q_index.numel() / max(layout.num_segments, 1)
    measured = auto_table.lookup(q, mean)
    if measured is None:
        return default
    return tuple(dict.fromkeys([n for n in measured if n in _MODULES] + list(default)))


def select_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None = None
) -> ModuleType:
    """Resolve ``backend`` ("auto" or a name) for these inputs, or raise ValueError saying why not.

    ``layout`` (optional) lets ``"auto"`` look up the measured order for its segment-size regime.
    """
    if not isinstance(backend, str) or (backend != "auto" and backend not in _MODULES):
        raise ValueError(f"backend must be 'auto' or one of {BACKEND_NAMES}, got {backend!r}")
    if backend == "auto":
        reasons = []
        for name in auto_order(q, layout):
            mod = get_backend(name)
            if mod is None or not mod.is_available():
                continue
            reason = _unsupported_reason(mod, q, k, v, layout)
            if reason is None:
                return mod
            reasons.append(f"{name}: {reason}")
        raise ValueError(f"no backend can run these inputs: {'; '.join(reasons) or 'none available'}")
    mod = get_backend(backend)
    if mod is None or not mod.is_available():
        why = mod.unsupported_reason(q, k, v) if mod is not None else None
        raise ValueError(
            f"backend {backend!r} is not available in this installation{f' ({why})' if why else ''} "
            f"({available_backends()=})"
        )
    reason = _unsupported_reason(mod, q, k, v, layout)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot run these inputs: {reason}")
    return mod


def _unsupported_reason(
    mod: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: SegmentLayout | None
) -> str | None:
    """The backend's reason, with the layout for backends whose limits depend on it (``REASONS_USE_LAYOUT``)."""
    if layout is not None and getattr(mod, "REASONS_USE_LAYOUT", False):
        return mod.unsupported_reason(q, k, v, layout)
    return mod.unsupported_reason(q, k, v)


for _name in BACKEND_NAMES:
    get_backend(_name)
del _name
