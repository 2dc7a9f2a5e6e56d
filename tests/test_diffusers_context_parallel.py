"""apply_moga under diffusers' own context parallelism (Ulysses), two gloo ranks on the CPU.

Each rank builds the same tiny Wan transformer with MoGA (routed top-2, STGA with shots and context frames,
per-frame branch), runs it once without parallelism (the reference), then calls
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` and runs it again. The outputs,
the layers' balance losses and group fractions must match the reference, and the parameter gradients summed over
the ranks must equal the reference's (routers and a pretrained projection alike).
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
LATENT = (1, 4, 3, 8, 8)  # post-patchify grid (3, 4, 4): 48 tokens, 24 per rank


def _model_and_inputs(parallel_config=None):
    """The model (the same weights and routers on every call) and its inputs. With ``parallel_config``, context
    parallelism is enabled BEFORE apply_moga (the other order is tested by enabling it afterwards)."""
    from moga.integrations.diffusers import apply_moga

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=2, rope_max_seq_len=32,
    ).eval()  # fmt: skip
    if parallel_config is not None:
        model.enable_parallelism(config=parallel_config)
    apply_moga(model, num_groups=3, top_k=2, window=(2, 2, 2), frame_attention=True, context_frames=1)
    torch.manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(LATENT),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 16),
        attention_kwargs={"shot_starts": [0, 2]},
        return_dict=False,
    )
    return model, inputs, torch.randn(LATENT)


WATCHED = ("blocks.0.attn1.router.proj.weight", "blocks.1.attn1.router.proj.weight", "blocks.0.attn1.to_q.weight")


def _run(model, inputs, weights) -> dict:
    from moga.integrations.diffusers import moga_balance_loss

    model.zero_grad(set_to_none=True)
    out = model(**inputs)[0]
    loss = (out * weights).sum() + 0.1 * moga_balance_loss(model)
    loss.backward()
    params = dict(model.named_parameters())
    return cp.moga_record(model, out, {name: params[name].grad.detach().clone() for name in WATCHED})


def _body() -> dict:
    from diffusers import ContextParallelConfig

    model, inputs, weights = _model_and_inputs()
    ref = _run(model, inputs, weights)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    got = _run(model, inputs, weights)
    cp.all_reduce_grads(got["grads"])
    model_first, inputs, weights = _model_and_inputs(ContextParallelConfig(ulysses_degree=WORLD))
    got_first = _run(model_first, inputs, weights)
    cp.all_reduce_grads(got_first["grads"])
    return {"ref": ref, "got": got, "got_parallel_first": got_first}


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return cp.gloo_records(tmp_path_factory, "diffusers_cp", _body, WORLD, SPAWN_TIMEOUT_S)


ORDERS = ["got", "got_parallel_first"]  # enable_parallelism after apply_moga, and before it


@pytest.mark.parametrize("order", ORDERS)
def test_output_matches_single_process(records, order: str) -> None:
    for rec in records:
        cp.assert_output_matches(rec[order], rec["ref"])


@pytest.mark.parametrize("order", ORDERS)
def test_balance_loss_and_group_fractions_are_the_whole_sequence(records, order: str) -> None:
    for rec in records:
        cp.assert_balance_and_fractions_match(rec[order], rec["ref"])


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", WATCHED)
def test_gradients_summed_over_ranks_match_single_process(records, name: str, order: str) -> None:
    for rec in records:
        got, ref = rec[order]["grads"][name], rec["ref"]["grads"][name]
        assert ref.norm() > 0
        assert rel_err(got, ref.double()) < 1e-5, name


def test_ring_attention_is_refused() -> None:
    from types import SimpleNamespace

    from moga.integrations.diffusers import _ulysses_group

    assert _ulysses_group(None) is None
    assert _ulysses_group(SimpleNamespace(context_parallel_config=None)) is None
    one = SimpleNamespace(ring_degree=1, ulysses_degree=1, ulysses_anything=False)
    assert _ulysses_group(SimpleNamespace(context_parallel_config=one)) is None
    ring = SimpleNamespace(ring_degree=2, ulysses_degree=1, ulysses_anything=False)
    with pytest.raises(NotImplementedError, match="ring_degree=2"):
        _ulysses_group(SimpleNamespace(context_parallel_config=ring))
    uneven = SimpleNamespace(ring_degree=1, ulysses_degree=2, ulysses_anything=True)
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        _ulysses_group(SimpleNamespace(context_parallel_config=uneven))
