"""Deterministic mode: a per-thread flag that kernel backends read to pick a path without float atomics.

The public functions take ``deterministic=True``; :func:`torch.use_deterministic_algorithms` switches it on
too. Kernel backends never see the keyword: they call :func:`deterministic_enabled` inside their forward
and backward functions and, when it is true, take a path whose floating-point summation order does not
depend on thread scheduling (no ``atomic_add`` on floats; e.g. per-tile partial sums reduced in a fixed
order), so two runs with the same inputs give bitwise identical outputs and gradients.

Backward runs after the public function has returned (and, on CUDA, on an autograd worker thread): the
shared autograd wrapper (:mod:`moga.backends._autograd`) records the flag in forward and re-enters the mode
around the backend's ``bwd``. The ``torch`` backend follows torch's own global flag.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_state = threading.local()


def _requested() -> bool:
    return getattr(_state, "enabled", False)


def deterministic_enabled() -> bool:
    """True when the current kernel call must be deterministic.

    That is inside a ``deterministic=True`` call of a public function (forward or its backward), or when
    ``torch.are_deterministic_algorithms_enabled()``. Kernel backends query this; it reads host state only.
    """
    return _requested() or torch.are_deterministic_algorithms_enabled()


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Within this context (on this thread) :func:`deterministic_enabled` is true if ``enabled``.

    ``enabled=False`` does not switch off a mode set by an enclosing context or by torch's global flag: a
    caller can only ask for more determinism, never less.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"deterministic must be a bool, got {type(enabled).__name__}")
    previous = _requested()
    _state.enabled = previous or enabled
    try:
        yield
    finally:
        _state.enabled = previous
