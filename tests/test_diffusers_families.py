"""apply_moga on every supported diffusers family (tiny random configs, CPU), and its refusals.

Per family: with one group and no static branch the output equals the stock model's; with M > 1, top-2 routing and
both static branches a forward and backward run, every router gets a gradient, and the routers save and reload with
the model's state_dict. Refusals (unsupported model or configuration, bad blocks) leave the model untouched.
"""

from __future__ import annotations

import pytest
import torch

import moga
from tests.utils import TOL, rel_err

diffusers = pytest.importorskip("diffusers")

from moga.integrations.diffusers import (  # noqa: E402
    SUPPORTED_MODELS,
    MoGAProcessorBase,
    apply_moga,
    moga_balance_loss,
    moga_processors,
)
from tests._diffusers_families import FAMILIES, WAN_ARGS, hunyuan_video_token_replace, output  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")


def snapshot(model: torch.nn.Module) -> dict:
    """Everything apply_moga could change: parameters and buffers, modules, processors, hooks."""
    return dict(
        state={k: v.clone() for k, v in model.state_dict().items()},
        modules=[n for n, _ in model.named_modules()],
        processors={n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")},
        hooks=len(model._forward_pre_hooks),
        state_attr=getattr(model, "_moga_video_state", None),
    )


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["processors"].keys() == before["processors"].keys()
    for name, proc in before["processors"].items():
        assert after["processors"][name] is proc, name
    assert after["hooks"] == before["hooks"]
    assert after["state_attr"] is before["state_attr"]


def tiny_hunyuan_dit():
    return diffusers.HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=2, cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=4,
        text_len_t5=4,
    )  # fmt: skip


class _WanSubclass(diffusers.WanTransformer3DModel):
    pass


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda: torch.nn.Linear(2, 2), {}, TypeError, "does not support torch.nn.modules.linear.Linear"),
        (tiny_hunyuan_dit, {}, TypeError, "HunyuanDiT2DModel"),
        (lambda: _WanSubclass(**WAN_ARGS), {}, TypeError, "_WanSubclass"),
        (lambda: FAMILIES["MochiTransformer3DModel"]()[0], {"blocks": [0, 2]}, ValueError, "blocks"),
        (lambda: FAMILIES["HunyuanVideoTransformer3DModel"]()[0], {"top_k": 4}, ValueError, "top_k"),
        (lambda: FAMILIES["CogVideoXTransformer3DModel"]()[0], {"window": (2, 0, 2)}, ValueError, "window"),
    ],
)  # fmt: skip
def test_refusals_leave_the_model_untouched(make, kwargs, error, match):
    model = make()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        apply_moga(model, 3, **kwargs)
    assert_unchanged(model, before)


def test_second_call_and_context_parallel_refusals_leave_the_model_untouched():
    model, _ = FAMILIES["MochiTransformer3DModel"]()
    apply_moga(model, 2, blocks=[1])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"MochiTransformer3DModel\.transformer_blocks\.1\.attn1 already uses MoGA"):
        apply_moga(model, 2)
    assert_unchanged(model, before)

    model, _ = FAMILIES["CogVideoXTransformer3DModel"]()
    model._parallel_config = object()  # what enable_parallelism records on the model
    before = snapshot(model)
    with pytest.raises(NotImplementedError, match="CogVideoXTransformer3DModel"):
        apply_moga(model, 2)
    assert_unchanged(model, before)


def test_wan_processor_refuses_a_mask_it_cannot_honour():
    """The Wan processor follows only SkyReels-V2's block-causal mask (num_frame_per_block > 1)."""
    model, x = FAMILIES["ChronoEditTransformer3DModel"]()
    apply_moga(model, 2)
    output(model, x)  # records the video state
    attn = model.blocks[0].attn1
    hidden = torch.randn(2, 48, attn.to_q.in_features)
    with pytest.raises(ValueError, match="ChronoEditTransformer3DModel.*cannot honour"):
        attn(hidden, None, torch.ones(1, 1, 48, 48, dtype=torch.bool), None)


def test_supported_models_are_the_tested_families():
    assert set(SUPPORTED_MODELS) == {"WanTransformer3DModel", *FAMILIES}


@pytest.mark.parametrize("name", [*FAMILIES, "HunyuanVideo token_replace"])
def test_one_group_without_static_branches_matches_the_stock_model(name):
    model, x = hunyuan_video_token_replace() if name == "HunyuanVideo token_replace" else FAMILIES[name]()
    n_layers = len(moga_processors(model))
    with torch.no_grad():
        want = output(model, x)
        assert apply_moga(model, 1) is model
        got = output(model, x)
    assert n_layers == 0 and len(moga_processors(model)) >= 2
    assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_routers_train_save_and_reload(name):
    torch.manual_seed(0)
    model, x = FAMILIES[name]()
    settings = dict(top_k=2, window=(2, 2, 2), frame_attention=True, context_frames=1)
    apply_moga(model, 3, **settings)
    routers = [n for n, _ in model.named_parameters() if ".router." in n]
    assert len(routers) == len(moga_processors(model)) >= 2
    assert {k for k in model.state_dict() if ".router." in k} == set(routers)

    out = output(model, x, attention_kwargs={"shot_starts": [1]})
    assert model._moga_video_state.grid == (3, 4, 4)
    assert torch.isfinite(out).all()
    (out.square().mean() + 0.1 * moga_balance_loss(model)).backward()
    for n, p in model.named_parameters():
        if ".router." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
    for proc in moga_processors(model):
        assert proc.last_group_fraction.sum().item() == pytest.approx(2.0)  # top-2: each token in two groups

    torch.manual_seed(1)  # other stock weights and routers, then the saved state
    fresh, _ = FAMILIES[name]()
    apply_moga(fresh, 3, **settings)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = output(model, x, attention_kwargs={"shot_starts": [1]})
        got = output(fresh, x, attention_kwargs={"shot_starts": [1]})
    assert torch.equal(got, want)


def test_shots_reach_the_joint_static_branch():
    model, x = FAMILIES["HunyuanVideoTransformer3DModel"]()
    apply_moga(model, 2, window=(2, 2, 2), context_frames=1)
    with torch.no_grad():
        one_shot = output(model, x)
        two_shots = output(model, x, attention_kwargs={"shot_starts": [1]})
    assert rel_err(two_shots, one_shot) > 1e-4


@pytest.mark.parametrize(
    "name,backend",
    [
        ("HunyuanVideoTransformer3DModel", "aot_eager"),  # also traces the backward (AOT autograd)
        ("CogVideoXTransformer3DModel", "eager"),
        ("MochiTransformer3DModel", "eager"),
        ("LTXVideoTransformer3DModel", "eager"),
        ("WanVACETransformer3DModel", "eager"),
        ("ChronoEditTransformer3DModel", "eager"),
    ],
)
def test_torch_compile_fullgraph_of_one_block(name, backend):
    """One converted block traced by Dynamo as a single graph (fullgraph=True), output equal to eager, backward run.
    The eager backend keeps it fast; one family goes through aot_eager, which traces the backward graph too."""
    model, x = FAMILIES[name]()
    apply_moga(model, 3, top_k=2, window=(2, 2, 2), frame_attention=True)
    blocks = model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks
    captured = {}

    def grab(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        output(model, x)
    handle.remove()
    args, kwargs = captured["call"]
    args = tuple(a.detach().requires_grad_() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)
    compiled = torch.compile(blocks[0], fullgraph=True, backend=backend)
    got, want = compiled(*args, **kwargs), blocks[0](*args, **kwargs)
    got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < TOL[torch.float32]
    sum(g.square().sum() for g in got).backward()
    attn = blocks[0].attn1 if hasattr(blocks[0], "attn1") else blocks[0].attn
    assert attn.router.proj.weight.grad.abs().sum() > 0


def test_paper_mmdit_config_on_hunyuan_video():
    """paper_config("mmdit"): M = 20, 4x4 windows per frame, per-frame branch, 2 context frames, top-1."""
    cfg = moga.paper_config("mmdit")
    model, x = FAMILIES["HunyuanVideoTransformer3DModel"]()
    apply_moga(
        model, cfg.num_groups, window=cfg.window, frame_attention=cfg.frame_attention,
        context_frames=cfg.context_frames, top_k=cfg.top_k,
    )  # fmt: skip
    out = output(model, x, attention_kwargs={"shot_starts": [2]})
    procs = moga_processors(model)
    assert len(procs) == 2 and all(p.last_group_fraction.numel() == 20 for p in procs)
    assert cfg.window.resolve(model._moga_video_state.grid) == (60, 1, 1)
    (out.square().mean() + cfg.balance_loss_weight * moga_balance_loss(model)).backward()
    assert all(model.get_submodule(n).router.proj.weight.grad.abs().sum() > 0 for n in _layer_names(model))


def _layer_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), MoGAProcessorBase)]


@pytest.mark.parametrize("name", ["HunyuanVideoTransformer3DModel", "SkyReelsV2Transformer3DModel"])
def test_context_parallel_enabled_after_apply_is_refused_at_forward(name):
    """enable_parallelism after apply_moga hands its config to the processors: families without MoGA context
    parallelism raise at the first forward instead of attending within each rank's shard."""
    from types import SimpleNamespace

    model, x = FAMILIES[name]()
    apply_moga(model, 2)
    cp = SimpleNamespace(ulysses_degree=2, ring_degree=1, ulysses_anything=False, _ulysses_mesh=None)
    for proc in moga_processors(model):
        proc._parallel_config = SimpleNamespace(context_parallel_config=cp)
    with pytest.raises(NotImplementedError, match=name):
        output(model, x)


def test_hunyuan_video_blocks_index_dual_then_single_stream_layers():
    model, x = FAMILIES["HunyuanVideoTransformer3DModel"]()  # one dual-stream and one single-stream block
    apply_moga(model, 2, blocks=[1])
    assert not isinstance(model.transformer_blocks[0].attn.processor, MoGAProcessorBase)
    assert isinstance(model.single_transformer_blocks[0].attn.processor, MoGAProcessorBase)
    assert [n for n, _ in model.named_parameters() if ".router." in n] == [
        "single_transformer_blocks.0.attn.router.proj.weight"
    ]
    with torch.no_grad():
        assert torch.isfinite(output(model, x)).all()
