"""Output allocation for kernels, with an optional poison mode for tests.

Kernels allocate their outputs and gradients through :func:`empty`. Inside :func:`poisoned_outputs`
those buffers start filled with NaN, so a test can prove that a kernel wrote every element it returns.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_poison = False


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty(*shape)``; NaN-filled (floating dtypes) inside :func:`poisoned_outputs`."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if _poison and t.dtype.is_floating_point:
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this context, kernel outputs are NaN-filled when allocated."""
    global _poison
    old, _poison = _poison, True
    try:
        yield
    finally:
        _poison = old
