"""apply_moga on a tiny random diffusers WanTransformer3DModel (no downloads, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

import moga
from moga.integrations.diffusers import MoGAWanAttnProcessor, apply_moga, moga_balance_loss, moga_processors
from moga.modules import apply_rotary_interleaved
from moga.reference import moga_attention_ref
from moga.window import window_attention_ref
from tests.utils import TOL, rel_err

diffusers = pytest.importorskip("diffusers")

LATENT = (1, 4, 3, 8, 8)  # (B, C, frames, height, width): post-patchify grid (3, 4, 4), 48 tokens
GRID = (3, 4, 4)


def tiny_wan(num_layers: int = 2) -> torch.nn.Module:
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=64, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


def inputs():
    return dict(
        hidden_states=torch.randn(LATENT),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 5, 16),
    )


def test_one_group_without_static_branches_leaves_output_unchanged():
    model, x = tiny_wan(), inputs()
    with torch.no_grad():
        want = model(**x).sample
        assert apply_moga(model, 1) is model
        got = model(**x).sample
    assert rel_err(got, want) < TOL[torch.float32]
    for block in model.blocks:  # Wan's fused q/k/v projection takes the to_qkv path of the processor
        block.attn1.fuse_projections()
    with torch.no_grad():
        assert rel_err(model(**x).sample, want) < TOL[torch.float32]
    assert all(isinstance(b.attn1.processor, MoGAWanAttnProcessor) for b in model.blocks)
    assert not any(isinstance(b.attn2.processor, MoGAWanAttnProcessor) for b in model.blocks)


def test_routers_train_and_save_with_the_model():
    model, x = tiny_wan(), inputs()
    apply_moga(model, 3, window=moga.WindowSplit(2, 2, 2), frame_attention=True, context_frames=1)
    router_names = [n for n, _ in model.named_parameters() if "router" in n]
    assert router_names == ["blocks.0.attn1.router.proj.weight", "blocks.1.attn1.router.proj.weight"]
    assert {k for k in model.state_dict() if "router" in k} == set(router_names)

    out = model(**x, attention_kwargs={"shot_starts": [1]}).sample
    assert model._moga_video_state.grid == GRID
    (out.square().mean() + 0.1 * moga_balance_loss(model)).backward()
    for name, p in model.named_parameters():
        if "router" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for proc in moga_processors(model):
        assert proc.last_group_fraction.sum().item() == pytest.approx(1.0)


def test_gradient_checkpointing_keeps_every_gradient():
    """Long-video training checkpoints the blocks: the balance loss is a side output of the checkpointed region,
    and must still carry its gradient (non-reentrant recomputation) exactly as without checkpointing."""
    x, weights = inputs(), torch.randn(LATENT)
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = tiny_wan().train()
        apply_moga(model, 3, top_k=2, window=(2, 2, 2), frame_attention=True)
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(**x).sample
        loss = (out * weights).sum() + 0.1 * moga_balance_loss(model)
        assert loss.requires_grad
        loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    assert any("router" in n for n in grads[True])
    for name, g in grads[False].items():
        assert torch.allclose(grads[True][name], g, rtol=1e-5, atol=1e-7), name


def test_torch_compile_fullgraph_matches_eager():
    """torch.compile of the whole converted transformer traces MoGA without a graph break (fullgraph=True):
    backend lookup and the cached window layouts must stay out of Dynamo's way."""
    model, x = tiny_wan(), inputs()
    apply_moga(model, 3, top_k=2, window=(2, 2, 2), frame_attention=True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the compiled graph on new values
            x["hidden_states"] = torch.randn(LATENT)
            ref = model(**x).sample
            assert rel_err(compiled(**x).sample, ref.double()) < TOL[torch.float32]


def test_torch_compile_fullgraph_training_step_matches_eager():
    """A training step (forward, balance loss, backward) of the compiled converted transformer, as one graph."""
    x, weights = inputs(), torch.randn(LATENT)
    grads = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = tiny_wan().train()
        apply_moga(model, 3, top_k=2, window=(2, 2, 2), frame_attention=True)
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_it else model
        out = run(**x).sample
        ((out * weights).sum() + 0.1 * moga_balance_loss(model)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[1].keys() == grads[0].keys() and any("router" in n for n in grads[0])
    for name, g in grads[0].items():
        assert rel_err(grads[1][name], g.double()) < 1e-5, name


@pytest.mark.parametrize("top_k,want", [(1, [1.0, 0.0, 0.0, 0.0]), (2, [1.0, 1.0, 0.0, 0.0])])
def test_group_fraction_follows_the_routing_on_ties(top_k, want):
    """Zero router weights tie every group: moga_attention routes every token to the lowest top_k groups, and the
    reported fractions must say so (torch.topk breaks ties its own way)."""
    model, x = tiny_wan(), inputs()
    apply_moga(model, 4, top_k=top_k)
    for block in model.blocks:
        torch.nn.init.zeros_(block.attn1.router.proj.weight)
    with torch.no_grad():
        model(**x)
    for proc in moga_processors(model):
        assert proc.last_group_fraction.tolist() == want


def test_processor_matches_float64_reference_of_the_three_branches():
    model = tiny_wan(num_layers=1).double()
    apply_moga(model, 3, window=(2, 2, 2), frame_attention=True, context_frames=1)
    model(**{k: (v.double() if v.is_floating_point() else v) for k, v in inputs().items()},
          attention_kwargs={"shot_starts": [2]})
    attn = model.blocks[0].attn1
    N, dim = math.prod(GRID), attn.to_q.in_features
    x = torch.randn(1, N, dim, dtype=torch.float64)
    cos, sin = model.rope(torch.zeros(LATENT, dtype=torch.float64))
    got = attn(x, None, None, (cos, sin))

    q = apply_rotary_interleaved(attn.norm_q(attn.to_q(x)).unflatten(2, (2, -1)), cos, sin)
    k = apply_rotary_interleaved(attn.norm_k(attn.to_k(x)).unflatten(2, (2, -1)), cos, sin)
    v = attn.to_v(x).unflatten(2, (2, -1))
    mean = (
        moga_attention_ref(q, k, v, attn.router(x))
        + window_attention_ref(q, k, v, GRID, (2, 2, 2), [2], 1)
        + window_attention_ref(q, k, v, GRID, (1, 4, 4))
    ) / 3
    want = attn.to_out[0](mean.flatten(2))
    assert rel_err(got, want) < 1e-10


def test_blocks_selects_blocks_and_shots_reach_the_static_branch():
    model, x = tiny_wan(), inputs()
    apply_moga(model, 2, window=(2, 2, 2), context_frames=1, blocks=[1])
    assert not isinstance(model.blocks[0].attn1.processor, MoGAWanAttnProcessor)
    assert isinstance(model.blocks[1].attn1.processor, MoGAWanAttnProcessor)
    with torch.no_grad():
        one_shot = model(**x).sample
        two_shots = model(**x, attention_kwargs={"shot_starts": [1]}).sample
        assert rel_err(two_shots, one_shot) > 1e-4
        with pytest.raises(ValueError, match="shot_starts"):
            model(**x, attention_kwargs={"shot_starts": [7]})


def test_bad_arguments_raise():
    model = tiny_wan()
    with pytest.raises(ValueError, match="blocks"):
        apply_moga(model, 2, blocks=[2])
    with pytest.raises(ValueError, match="top_k"):
        apply_moga(model, 2, top_k=3)
    with pytest.raises(ValueError, match="num_groups must be positive"):
        apply_moga(model, 0)
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_moga(torch.nn.Linear(2, 2), 2)
    apply_moga(model, 2, blocks=[0])
    with pytest.raises(ValueError, match="already"):
        apply_moga(model, 2)
