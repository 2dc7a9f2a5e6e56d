"""Block-causal MoGA (SkyReels-V2 diffusion forcing, num_frame_per_block > 1): the block restriction of every branch
against a dense float64 reference, and the converted SkyReels-V2 model against the stock one."""

from __future__ import annotations

import pytest
import torch

from moga.integrations._block_causal import block_causal_layer_attention
from moga.reference import masked_attention_ref, topk_membership_ref
from moga.window import window_mask_ref
from tests._gpu_backends import gpu_backends
from tests.utils import TOL, assert_weighted_grads_match, rel_err

diffusers = pytest.importorskip("diffusers")

from moga.integrations.diffusers import apply_moga, moga_balance_loss  # noqa: E402
from tests._diffusers_families import output, skyreels_block_causal  # noqa: E402

B, H, D, M = 2, 2, 32, 3
GRID, FPB = (4, 2, 3), 2  # 24 tokens, two causal blocks of two frames
N = 24


def block_causal_ref(q, k, v, logits, top_k, window, shots, ctx):
    frame = torch.arange(N) // (GRID[1] * GRID[2])
    block = frame // FPB
    causal = block[None, :] <= block[:, None]
    probs = logits.double().softmax(-1)
    member = topk_membership_ref(probs, top_k)
    routed = 0
    for m in range(M):
        mask = member[..., m][:, :, None] & member[..., m][:, None, :] & causal
        routed = routed + (probs[..., m] * member[..., m])[..., None, None] * masked_attention_ref(q, k, v, mask)
    branches = [routed]
    for win, c in ((window, ctx), ((1, GRID[1], GRID[2]), 0)):
        mask = (window_mask_ref(GRID, win, shots, c) & causal).expand(B, -1, -1)
        branches.append(masked_attention_ref(q, k, v, mask))
    return sum(branches) / len(branches)


CASES = [("torch", "cpu", 1), ("cpu", "cpu", 2), ("triton", "cpu", 2)] + [(b, "cuda", 2) for b in gpu_backends()]


@pytest.mark.parametrize("backend,device,top_k", CASES)
def test_block_causal_branches_match_dense_reference_with_gradients(backend, device, top_k):
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    logits = torch.randn(B, N, M, requires_grad=True)
    got = block_causal_layer_attention(
        q.to(device), k.to(device), v.to(device), logits.to(device), frames_per_block=FPB, grid=GRID, top_k=top_k,
        window=(3, 1, 2), frame_attention=True, shot_starts=[3], context_frames=1, backend=backend,
    ).cpu()  # fmt: skip
    want = block_causal_ref(q, k, v, logits, top_k, (3, 1, 2), [3], 1)
    assert rel_err(got, want) < 1e-5
    assert_weighted_grads_match(got, want, (q, k, v, logits), "q k v logits".split())


def test_frames_must_fill_whole_blocks():
    q = torch.randn(1, N, H, D)
    with pytest.raises(ValueError, match="multiple of frames_per_block=3"):
        block_causal_layer_attention(q, q, q, torch.randn(1, N, M), frames_per_block=3, grid=GRID)


def test_skyreels_block_causal_one_group_matches_the_stock_model():
    model, x = skyreels_block_causal()
    with torch.no_grad():
        want = output(model, x)
        apply_moga(model, 1)
        got = output(model, x)
        model._set_ar_attention(1)  # the same converted model without the causal mask: a different result
        non_causal = output(model, x)
    assert rel_err(got, want) < TOL[torch.float32]
    assert rel_err(non_causal, want) > 1e-3


def test_skyreels_block_causal_trains_and_reloads():
    torch.manual_seed(0)
    model, x = skyreels_block_causal()
    settings = dict(top_k=2, window=(3, 2, 2), frame_attention=True, context_frames=1)
    apply_moga(model, 3, **settings)
    out = output(model, x, attention_kwargs={"shot_starts": [2]})
    (out.square().mean() + 0.1 * moga_balance_loss(model)).backward()
    routers = {n: p for n, p in model.named_parameters() if ".router." in n}
    assert len(routers) == 2 and all(p.grad.abs().sum() > 0 for p in routers.values())
    torch.manual_seed(1)
    fresh, _ = skyreels_block_causal()
    apply_moga(fresh, 3, **settings)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(output(fresh, x, attention_kwargs={"shot_starts": [2]}),
                           output(model, x, attention_kwargs={"shot_starts": [2]}))  # fmt: skip


def test_torch_compile_fullgraph_of_one_block_causal():
    """A block-causal SkyReels-V2 block traced by Dynamo as one graph, output equal to eager, backward run."""
    model, x = skyreels_block_causal()
    apply_moga(model, 3, top_k=2, window=(3, 2, 2), frame_attention=True)
    captured = {}
    handle = model.blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.setdefault("call", (args, kwargs)), with_kwargs=True
    )
    with torch.no_grad():
        output(model, x)
    handle.remove()
    args, kwargs = captured["call"]
    assert args[-1] is not None  # the block got the model's block-causal mask
    hidden = args[0].detach().requires_grad_()
    compiled = torch.compile(model.blocks[0], fullgraph=True, backend="eager")
    got = compiled(hidden, *args[1:], **kwargs)
    assert rel_err(got, model.blocks[0](hidden, *args[1:], **kwargs)) < TOL[torch.float32]
    got.square().sum().backward()
    assert model.blocks[0].attn1.router.proj.weight.grad.abs().sum() > 0
