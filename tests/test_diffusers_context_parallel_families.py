"""apply_moga under diffusers' context parallelism (Ulysses, two gloo ranks on the CPU) for the families beyond
Wan that diffusers parallelises (a ``_cp_plan``): ChronoEdit (Wan's processor) and LTX-Video (its own processor on
the shared Ulysses path). As for Wan (tests/test_diffusers_context_parallel.py): outputs, balance losses and group
fractions match one process, and parameter gradients summed over the ranks equal the single-process ones.

LTX-Video is checked forward only: diffusers 0.42.1 splits LTX's text tokens across the ranks too, and its own
Ulysses backward of the cross-attention (which MoGA leaves alone) fails when text and video shards differ in
length ("shape '[2, 2, 24, 1, 32]' is invalid for input of size 384"), with or without MoGA.
"""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
import torch.distributed as dist

from tests.utils import TOL, free_port, rel_err, spawn_ranks

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.models._modeling_parallel")

WORLD = 2
SPAWN_TIMEOUT_S = 300
NAMES = ("ChronoEditTransformer3DModel", "LTXVideoTransformer3DModel")
FORWARD_ONLY = ("LTXVideoTransformer3DModel",)


def _run(name: str, parallel: bool) -> dict:
    from diffusers import ContextParallelConfig

    from moga.integrations.diffusers import apply_moga, moga_balance_loss, moga_processors
    from tests._diffusers_families import FAMILIES, output

    torch.manual_seed(0)
    model, inputs = FAMILIES[name]()
    if "encoder_attention_mask" in inputs:
        # diffusers 0.42.1's own Ulysses cross-attention of LTX fails with a text mask on the CPU (SDPA's mask
        # broadcast, "output with shape [2, 1, 48, 6] doesn't match the broadcast shape [2, 2, 48, 6]"), with or
        # without MoGA: the text mask belongs to the cross-attention, which MoGA leaves alone.
        inputs["encoder_attention_mask"] = None
    apply_moga(model, num_groups=3, top_k=2, window=(2, 2, 2), frame_attention=True, context_frames=1)
    if parallel:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    torch.manual_seed(1)
    out = output(model, inputs, attention_kwargs={"shot_starts": [1]})
    weights = torch.randn(out.shape)
    if name not in FORWARD_ONLY:
        ((out * weights).sum() + 0.1 * moga_balance_loss(model)).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    if parallel:
        for g in grads.values():
            dist.all_reduce(g)  # what a trainer's gradient sync over the CP group does
    return {
        "out": out.detach(),
        "balance": [p.last_balance_loss.detach() for p in moga_processors(model)],
        "fraction": [p.last_group_fraction for p in moga_processors(model)],
        "grads": grads,
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # The shims of tests/test_diffusers_context_parallel.py for diffusers' context parallelism without a GPU.
        torch.accelerator.device_count = lambda: 1
        if not hasattr(logging.Logger, "warning_once"):
            logging.Logger.warning_once = logging.Logger.warning
        result = {name: {"ref": _run(name, False), "got": _run(name, True)} for name in NAMES}
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see tests/test_diffusers_context_parallel.py: gloo teardown sometimes aborts at exit


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out_dir = str(tmp_path_factory.mktemp("diffusers_cp_families"))
    return spawn_ranks(_worker, WORLD, (free_port(), out_dir), out_dir, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("name", NAMES)
def test_context_parallel_matches_single_process(records, name: str) -> None:
    for rec in records:
        ref, got = rec[name]["ref"], rec[name]["got"]
        assert rel_err(got["out"], ref["out"].double()) < TOL[torch.float32]
        for g, r in zip(got["balance"], ref["balance"], strict=True):
            assert torch.allclose(g, r, rtol=1e-5, atol=1e-7)
        for g, r in zip(got["fraction"], ref["fraction"], strict=True):
            assert torch.allclose(g, r, atol=1e-7)
        if name in FORWARD_ONLY:
            continue
        assert got["grads"].keys() == ref["grads"].keys()
        assert any(".router." in n for n in ref["grads"])
        for n, r in ref["grads"].items():
            assert rel_err(got["grads"][n], r.double()) < 1e-5, n
