"""apply_moga under diffusers' context parallelism (Ulysses, two gloo ranks on the CPU) for the families beyond
Wan that diffusers parallelises (a ``_cp_plan``): ChronoEdit (Wan's processor) and LTX-Video (its own processor on
the shared Ulysses path). As for Wan (tests/test_diffusers_context_parallel.py): outputs, balance losses and group
fractions match one process, and parameter gradients summed over the ranks equal the single-process ones.

LTX-Video is checked forward only: diffusers 0.42.1 splits LTX's text tokens across the ranks too, and its own
Ulysses backward of the cross-attention (which MoGA leaves alone) fails when text and video shards differ in
length ("shape '[2, 2, 24, 1, 32]' is invalid for input of size 384"), with or without MoGA.
"""

from __future__ import annotations

import pytest
import torch

from tests import _context_parallel as cp
from tests.utils import rel_err

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("diffusers.models._modeling_parallel")

WORLD = 2
SPAWN_TIMEOUT_S = 300
NAMES = ("ChronoEditTransformer3DModel", "LTXVideoTransformer3DModel")
FORWARD_ONLY = ("LTXVideoTransformer3DModel",)


def _run(name: str, parallel: bool) -> dict:
    from diffusers import ContextParallelConfig

    from moga.integrations.diffusers import apply_moga, moga_balance_loss
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
        cp.all_reduce_grads(grads)
    return cp.moga_record(model, out, grads)


def _body() -> dict:
    return {name: {"ref": _run(name, False), "got": _run(name, True)} for name in NAMES}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return cp.gloo_records(tmp_path_factory, "diffusers_cp_families", _body, WORLD, SPAWN_TIMEOUT_S)


@pytest.mark.parametrize("name", NAMES)
def test_context_parallel_matches_single_process(records, name: str) -> None:
    for rec in records:
        ref, got = rec[name]["ref"], rec[name]["got"]
        cp.assert_output_matches(got, ref)
        cp.assert_balance_and_fractions_match(got, ref)
        if name in FORWARD_ONLY:
            continue
        assert got["grads"].keys() == ref["grads"].keys()
        assert any(".router." in n for n in ref["grads"])
        for n, r in ref["grads"].items():
            assert rel_err(got["grads"][n], r.double()) < 1e-5, n
