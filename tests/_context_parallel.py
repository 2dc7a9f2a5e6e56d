"""What the diffusers context-parallel tests share (tests/test_diffusers_context_parallel.py for Wan,
tests/test_diffusers_context_parallel_families.py for the other families): spawning the gloo ranks that run a test's
body, the record of one MoGA model call, the gradient sync of a trainer, and the checks of a parallel record against
one process's."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist

from tests.utils import TOL, free_port, rel_err, spawn_ranks


def gloo_records(tmp_path_factory, name: str, body: Callable[[], object], world: int, timeout_s: float) -> list:
    """What ``body()`` (a module-level function: the spawned ranks import it) returns on each of ``world`` spawned
    gloo ranks (``run_rank``), rank by rank, exchanged through a fresh temporary folder ``name``. Skips the test
    where torch.distributed has no gloo."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp(name))
    return spawn_ranks(run_rank, world, (world, free_port(), out_dir, body), out_dir, timeout_s)


def run_rank(rank: int, world: int, port: int, out_dir: str, body: Callable[[], object]) -> None:
    """One spawned gloo rank (``rank`` of ``world``, on 127.0.0.1:``port``): pickles what ``body()`` returns to
    ``out_dir/rank<rank>.pkl`` (where tests.utils.spawn_ranks reads it), destroys the process group, and leaves
    without interpreter teardown."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Two shims for running diffusers' context parallelism on a machine without an accelerator: its mesh setup
        # takes `rank % torch.accelerator.device_count()` (0 on a CPU-only machine), and its input splitter calls
        # `logger.warning_once` (missing from the stdlib logger) for the (B,)-shaped Wan 2.1 timestep.
        torch.accelerator.device_count = lambda: 1
        if not hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once = logging.Logger.warning
        result = body()
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: after diffusers' context parallelism on gloo, the process sometimes
    # aborts at exit ("terminate called without an active exception", SIGABRT), with or without moga imported
    # (3 of 16 runs of the stock Wan model here). The results are already on disk.
    os._exit(0)


def all_reduce_grads(grads: dict[str, torch.Tensor]) -> None:
    """Sums each gradient over the ranks in place: what a trainer's gradient sync over the CP group does."""
    for g in grads.values():
        dist.all_reduce(g)


def moga_record(model: torch.nn.Module, out: torch.Tensor, grads: dict[str, torch.Tensor]) -> dict:
    """One call's record: its output, each MoGA layer's balance loss and group fractions, and ``grads``."""
    from moga.integrations.diffusers import moga_processors

    return {
        "out": out.detach(),
        "balance": [p.last_balance_loss.detach() for p in moga_processors(model)],
        "fraction": [p.last_group_fraction for p in moga_processors(model)],
        "grads": grads,
    }


def assert_output_matches(got: dict, ref: dict) -> None:
    """A parallel record's output against one process's (``moga_record`` dicts): same shape, float32 tolerance."""
    assert got["out"].shape == ref["out"].shape
    assert rel_err(got["out"], ref["out"].double()) < TOL[torch.float32]


def assert_balance_and_fractions_match(got: dict, ref: dict) -> None:
    """Each layer's balance loss and group fractions (``moga_record`` dicts) are those of the whole sequence."""
    for g, r in zip(got["balance"], ref["balance"], strict=True):
        assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
    for g, r in zip(got["fraction"], ref["fraction"], strict=True):
        assert torch.allclose(g, r, atol=1e-7)
