"""Test configuration. Without a GPU the Triton kernels run through the Triton interpreter, which must be
switched on before any kernel module is imported (TRITON_INTERPRET is read at @triton.jit time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
