"""configs.override(): the tile-sweep hook takes effect inside its block, for its key only, outside the
interpreter only, keyed by tile width, and is undone on exit (normal, by an exception, nested)."""

from __future__ import annotations

import pytest
import torch

from moga.kernels.segment_attention import configs
from moga.kernels.segment_attention.configs import KernelConfig

CPU = torch.device("cpu")
CANDIDATE = KernelConfig(block_m=32, block_n=128, num_warps=8, num_stages=2)
OTHER = KernelConfig(block_m=16, block_n=64, num_warps=4, num_stages=1)


@pytest.fixture
def gpu_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """config() as on a GPU: no interpreter (the device argument only decides Hopper, False for the CPU)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_override_takes_effect_for_its_key_only(gpu_mode: None) -> None:
    table = configs.config("dkdv", 128, torch.bfloat16, CPU)
    assert table == configs.production_config("dkdv", 128, torch.bfloat16) != CANDIDATE
    with configs.override("dkdv", 128, torch.bfloat16, CANDIDATE) as cfg:
        assert cfg is CANDIDATE
        assert configs.config("dkdv", 128, torch.bfloat16, CPU) is CANDIDATE
        # Another dtype, head dim or kernel keeps its table entry.
        assert configs.config("dkdv", 128, torch.float16, CPU) == configs.production_config("dkdv", 128, torch.float16)
        assert configs.config("dkdv", 64, torch.bfloat16, CPU) == configs.production_config("dkdv", 64, torch.bfloat16)
        assert configs.config("dq", 128, torch.bfloat16, CPU) == configs.production_config("dq", 128, torch.bfloat16)
    assert configs.config("dkdv", 128, torch.bfloat16, CPU) == table


def test_override_is_keyed_by_the_tile_width(gpu_mode: None) -> None:
    """The kernels ask config() for the padded width (an input with D = 80 runs in 128-wide tiles): an override
    given at D = 80 must reach them, and must leave other tile widths alone."""
    assert configs.padded_head_dim(80) == 128
    with configs.override("fwd", 80, torch.bfloat16, CANDIDATE):
        assert configs.config("fwd", 128, torch.bfloat16, CPU) is CANDIDATE
        assert configs.config("fwd", 80, torch.bfloat16, CPU) is CANDIDATE
        assert configs.config("fwd", 64, torch.bfloat16, CPU) == configs.production_config("fwd", 64, torch.bfloat16)
        assert configs.config("fwd", 256, torch.bfloat16, CPU) == configs.production_config("fwd", 256, torch.bfloat16)
    assert configs.config("fwd", 128, torch.bfloat16, CPU) == configs.production_config("fwd", 128, torch.bfloat16)
    assert configs._OVERRIDES == {}


def test_override_is_undone_by_an_exception(gpu_mode: None) -> None:
    table = configs.config("fwd", 64, torch.float16, CPU)
    with pytest.raises(RuntimeError, match="launch failed"):
        with configs.override("fwd", 64, torch.float16, CANDIDATE):
            assert configs.config("fwd", 64, torch.float16, CPU) is CANDIDATE
            raise RuntimeError("launch failed")
    assert configs.config("fwd", 64, torch.float16, CPU) == table


def test_nested_overrides_restore_the_outer_one(gpu_mode: None) -> None:
    with configs.override("dq", 32, torch.float32, CANDIDATE):
        with configs.override("dq", 32, torch.float32, OTHER):
            assert configs.config("dq", 32, torch.float32, CPU) is OTHER
        assert configs.config("dq", 32, torch.float32, CPU) is CANDIDATE
    assert configs.config("dq", 32, torch.float32, CPU) == configs.production_config("dq", 32, torch.float32)


def test_interpreter_ignores_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with configs.override("fwd", 128, torch.float16, CANDIDATE):
        assert configs.config("fwd", 128, torch.float16, CPU) == configs.INTERPRETER_CONFIG


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("bwd", 64, torch.float16, CANDIDATE), ValueError),  # no such kernel
        (("fwd", 512, torch.float16, CANDIDATE), ValueError),  # head dim out of range
        (("fwd", 64, torch.int8, CANDIDATE), TypeError),  # dtype the kernels do not take
        (("fwd", 64, torch.float16, (32, 128, 8, 2)), TypeError),  # not a KernelConfig
        (("fwd", 64, torch.float16, KernelConfig(48, 64, 4, 2)), ValueError),  # tl.arange needs powers of two
        (("fwd", 64, torch.float16, KernelConfig(64, 64, 0, 2)), ValueError),
    ],
)
def test_override_rejects_bad_arguments(gpu_mode: None, args: tuple, error: type[Exception]) -> None:
    with pytest.raises(error):
        with configs.override(*args):
            pass
    assert configs._OVERRIDES == {}
