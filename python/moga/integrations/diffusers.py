"""Drop-in MoGA for diffusers' video transformers (see docs/integrations.md for the per-family table).

:func:`apply_moga` swaps the attention processor of each chosen layer for a MoGA processor of the model's family
and registers a router on that attention module (e.g. ``blocks.<i>.attn1.router``), so the pretrained q/k/v/out
weights and QK-norms are reused unchanged and the routers train and save with the model. Families
(:data:`SUPPORTED_MODELS`):

* Wan 2.1 and its derivatives with the same self-attention: ``WanTransformer3DModel``,
  ``SkyReelsV2Transformer3DModel`` (with diffusion forcing's block-causal mask, ``num_frame_per_block > 1``,
  intersected with every branch: :mod:`moga.integrations._block_causal`),
  ``WanVACETransformer3DModel`` (the main ``blocks``; the VACE control blocks keep dense attention),
  ``ChronoEditTransformer3DModel``: :class:`MoGAWanAttnProcessor` on ``blocks.<i>.attn1``; cross-attention
  (``attn2``) is left alone.
* ``LTXVideoTransformer3DModel`` (separate cross-attention too): :class:`MoGALTXAttnProcessor` on
  ``transformer_blocks.<i>.attn1``.
* Joint text-video attention (MMDiT), where text tokens stay global (see :mod:`moga.integrations._core`):
  ``HunyuanVideoTransformer3DModel`` (dual-stream then single-stream layers), ``CogVideoXTransformer3DModel``,
  ``MochiTransformer3DModel``: :mod:`moga.integrations.diffusers_mmdit`.

Everything is checked before the model is touched: an unsupported model or configuration raises with the model
class and the reason, and leaves parameters, modules and processors as they were.

Without training: ``router="kmeans"`` groups each layer's video tokens by k-means of its keys (gate 1, clusters
warm-started across calls, nothing added to the state_dict); ``router_init=calibrate`` starts the learned routers
from k-means of the hidden states they see on the unconverted model (:mod:`moga.integrations._router_init`).

The static branches need the post-patchify grid (T, H, W): a forward pre-hook on the transformer records it
from the call's inputs (the latents' ``(frames, height, width) // patch_size``, or LTX's ``num_frames, height,
width``) on every call. Shot boundaries (latent frames, after patchify) are passed as
``attention_kwargs={"shot_starts": [...]}`` to the transformer call.

Sequence parallelism (Wan, ChronoEdit and LTX-Video: the supported families diffusers 0.42.1 can parallelise, i.e.
with a ``_cp_plan``): after ``apply_moga``, diffusers' own context parallelism
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``) works unchanged. diffusers
hands each MoGA processor its rank's contiguous shard of the tokens; the processor then runs Ulysses itself
(:mod:`moga.distributed`): one all-to-all of q, k, v to head shards, an all-gather of the router logits, the routed
and static branches over the full sequence for its H/P heads, and an all-to-all back. Outputs match a single
process; each rank's parameter gradients are the part of its own tokens (summed over the CP group they equal the
single-process gradients), for the routers exactly as for every other weight. Ring attention is not supported.
The other families are refused under context parallelism (NotImplementedError).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moga.integrations._core import (  # noqa: F401 (re-exported)
    ROUTER_KINDS,
    MoGAProcessorBase,
    VideoState,
    _ulysses_group,
)
from moga.integrations._router_init import RouterInit, check_router_init, kmeans_routers, record_router_inputs
from moga.integrations.diffusers_mmdit import (
    MoGACogVideoXAttnProcessor,
    MoGAHunyuanVideoAttnProcessor,
    MoGALTXAttnProcessor,
    MoGAMochiAttnProcessor,
)
from moga.kmeans import KMeansRouter
from moga.modules import WindowArg, apply_rotary_interleaved, check_layer_settings
from moga.router import MoGARouter

SHOT_STARTS_KEY = "shot_starts"

__all__ = [
    "SHOT_STARTS_KEY",
    "SUPPORTED_MODELS",
    "MoGACogVideoXAttnProcessor",
    "MoGAHunyuanVideoAttnProcessor",
    "MoGALTXAttnProcessor",
    "MoGAMochiAttnProcessor",
    "MoGAProcessorBase",
    "MoGAWanAttnProcessor",
    "VideoState",
    "apply_moga",
    "moga_balance_loss",
    "moga_processors",
    "reset_kmeans_clusters",
]


class MoGAWanAttnProcessor(MoGAProcessorBase):
    """Processor for a Wan self-attention module (``WanAttention`` with ``router`` attached by apply_moga).

    Projections, QK RMSNorm and rotary embedding are applied exactly as ``diffusers.WanAttnProcessor``
    does (rotary before routing); then the routed branch and the enabled static branches run on the shared
    q, k, v (see :func:`moga.modules.moga_layer_attention`) and ``to_out`` projects the mean.

    After each call ``last_balance_loss`` is this layer's group balance loss (paper form, without alpha) and
    ``last_group_fraction`` (M,) the fraction of tokens routed to each group (detached). Under diffusers'
    context parallelism both are those of the whole sequence, identical on every rank; the balance loss's gradient
    reaches only this rank's tokens (summed over ranks it is the single-process gradient).
    """

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("MoGAWanAttnProcessor is for self-attention: encoder_hidden_states must be None")
        block_causal = attention_mask is not None
        if block_causal and self.state.frames_per_block <= 1:
            raise ValueError(
                f"MoGAWanAttnProcessor ({self.model_name}) got an attention mask it cannot honour: the only mask it "
                "follows is SkyReels-V2's block-causal one (config num_frame_per_block > 1)"
            )
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_rotary_interleaved(query, *rotary_emb)
            key = apply_rotary_interleaved(key, *rotary_emb)

        # (B, n, M): this rank's tokens under context parallelism (learned router; the k-means one refuses it)
        logits = self._router_logits(attn, hidden_states, key)
        # Block-causal (SkyReels-V2 diffusion forcing): the dense mask is not read, its block structure is rebuilt
        # from the model's num_frame_per_block (the model builds the mask from it).
        out = self._layer_attention(query, key, value, logits, block_causal=block_causal)

        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _latent_grid_5d(channels_first: bool) -> Callable[[nn.Module, dict], tuple[int, int, int]]:
    """Grid of latents (B, C, F, H, W) (``channels_first``) or (B, F, C, H, W) after the model's patchify."""

    def grid(model: nn.Module, call: dict) -> tuple[int, int, int]:
        x = call["hidden_states"]
        if x.dim() != 5:
            raise ValueError(f"{type(model).__name__}: hidden_states must be 5-D latents, got {tuple(x.shape)}")
        frames, height, width = (x.shape[2], x.shape[3], x.shape[4]) if channels_first else (
            x.shape[1], x.shape[3], x.shape[4]
        )  # fmt: skip
        cfg = model.config
        if isinstance(cfg.patch_size, int):
            p_t = getattr(cfg, "patch_size_t", None) or 1
            p_h = p_w = cfg.patch_size
        else:
            p_t, p_h, p_w = cfg.patch_size
        return frames // p_t, height // p_h, width // p_w

    return grid


def _ltx_grid(model: nn.Module, call: dict) -> tuple[int, int, int] | None:
    dims = (call.get("num_frames"), call.get("height"), call.get("width"))
    return None if any(d is None for d in dims) else tuple(int(d) for d in dims)


def _layers_attr(*paths: tuple[str, str]) -> Callable[[nn.Module], list[tuple[str, nn.Module]]]:
    """The attention modules ``<list>.<i>.<attr>`` for each (list, attr), in order."""

    def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (f"{blocks}.{i}.{attr}", getattr(block, attr))
            for blocks, attr in paths
            for i, block in enumerate(getattr(model, blocks))
        ]

    return layers


@dataclass(frozen=True)
class _Family:
    """How apply_moga converts one diffusers model class."""

    processor: type
    layers: Callable[[nn.Module], list[tuple[str, nn.Module]]]
    grid: Callable[[nn.Module, dict], tuple[int, int, int] | None]
    context_parallel: bool = False


_WAN = dict(processor=MoGAWanAttnProcessor, layers=_layers_attr(("blocks", "attn1")), grid=_latent_grid_5d(True))
_FAMILIES: dict[str, _Family] = {
    "WanTransformer3DModel": _Family(**_WAN, context_parallel=True),
    "SkyReelsV2Transformer3DModel": _Family(**_WAN),
    "WanVACETransformer3DModel": _Family(**_WAN),
    "ChronoEditTransformer3DModel": _Family(**_WAN, context_parallel=True),
    "LTXVideoTransformer3DModel": _Family(
        MoGALTXAttnProcessor, _layers_attr(("transformer_blocks", "attn1")), _ltx_grid, context_parallel=True
    ),
    "HunyuanVideoTransformer3DModel": _Family(
        MoGAHunyuanVideoAttnProcessor,
        _layers_attr(("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")),
        _latent_grid_5d(True),
    ),
    "CogVideoXTransformer3DModel": _Family(
        MoGACogVideoXAttnProcessor, _layers_attr(("transformer_blocks", "attn1")), _latent_grid_5d(False)
    ),
    "MochiTransformer3DModel": _Family(
        MoGAMochiAttnProcessor, _layers_attr(("transformer_blocks", "attn1")), _latent_grid_5d(True)
    ),
}
SUPPORTED_MODELS: tuple[str, ...] = tuple(_FAMILIES)
"""Class names of the diffusers transformers :func:`apply_moga` converts."""


def _family_of(transformer: nn.Module) -> _Family:
    """The family of a diffusers transformer, or TypeError naming the class and why it is refused."""
    cls = type(transformer)
    name = cls.__name__
    if name not in _FAMILIES or not cls.__module__.startswith("diffusers."):
        raise TypeError(
            f"apply_moga does not support {cls.__module__}.{name}: it converts the diffusers transformers "
            f"{', '.join(SUPPORTED_MODELS)} (exact classes; subclasses may change the attention call)"
        )
    return _FAMILIES[name]


def _check_attention_module(name: str, attn: nn.Module, model_name: str) -> None:
    missing = [a for a in ("to_q", "to_k", "to_v", "heads", "processor") if not hasattr(attn, a)]
    if missing:
        raise TypeError(
            f"apply_moga cannot convert {model_name}.{name} ({type(attn).__name__}): it lacks {', '.join(missing)}"
        )


def _record_video_state(state: VideoState, grid_fn: Callable, params: tuple[str, ...]):
    """Forward pre-hook: the grid and shots of this call (arguments looked up by name or position, no inspect
    at call time, so torch.compile traces it)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = dict(zip(params, args, strict=False))
        call.update(kwargs)
        state.grid = grid_fn(module, call)
        state.frames_per_block = getattr(module.config, "num_frame_per_block", 1) or 1
        attention_kwargs = call.get("attention_kwargs") or {}
        state.shot_starts = attention_kwargs.get(SHOT_STARTS_KEY)

    return hook


def apply_moga(
    transformer: nn.Module,
    num_groups: int,
    *,
    window: WindowArg = None,
    frame_attention: bool = False,
    top_k: int = 1,
    blocks: Iterable[int] | None = None,
    context_frames: int = 0,
    router_bias: bool = False,
    backend: str = "auto",
    router: str = "learned",
    kmeans_iters: tuple[int, int] = (20, 2),
    router_init: RouterInit | None = None,
    router_init_tokens: int = 4096,
) -> nn.Module:
    """Replace the self-attention (or joint text-video attention) of a diffusers video transformer with MoGA,
    in place.

    Args:
        transformer: one of :data:`SUPPORTED_MODELS` (Wan 2.1 and derivatives, LTX-Video, HunyuanVideo,
            CogVideoX, Mochi).
        num_groups: M, groups of the routed branch (M = 1 with no static branch leaves the output unchanged).
        window: STGA window, fixed (wt, wh, ww) in post-patchify tokens or a :class:`moga.WindowSplit`
            (e.g. ``moga.paper_config("wan").window``); None: no STGA branch.
        frame_attention: add the per-frame branch.
        top_k: groups per token.
        blocks: indices of the attention layers to convert (all by default), in the model's order: ``blocks`` for
            the Wan family, ``transformer_blocks`` otherwise, and for HunyuanVideo the dual-stream
            ``transformer_blocks`` followed by the ``single_transformer_blocks``.
        context_frames: cross-shot context frames of the STGA branch (shots come from
            ``attention_kwargs={"shot_starts": [...]}`` at call time).
        router_bias: bias of the new routers (initialised by ``nn.Linear``'s default).
        backend: segment-attention backend.
        router: "learned" (the paper's trainable :class:`moga.MoGARouter` on the layer's hidden states) or
            "kmeans": training-free groups, the k-means clusters of the layer's video keys (after QK norm and rotary
            embedding, heads concatenated: one grouping shared by all heads, as MoGA's) with a gate of 1. Each layer
            keeps its clustering (a :class:`moga.kmeans.KMeansRouter`, ``<layer>.router``, no parameters or
            buffers: the state_dict gains nothing) and warm-starts it on the next call, as Sparse VideoGen2 does
            across diffusion steps; :func:`reset_kmeans_clusters` forgets it (a new video). Needs ``top_k=1`` and
            no context parallelism.
        kmeans_iters: (first, warm) with ``router="kmeans"``: Lloyd iterations of a cold start (k-means++, seed 0)
            and of each later call started from the previous call's centroids (a call whose keys have another
            shape, dtype or device starts cold).
        router_init: a callable ``router_init(transformer)`` that runs the (still unconverted) transformer forward
            on a few calibration inputs, e.g. ``lambda m: [m(**batch) for batch in batches]``; apply_moga runs it
            under ``torch.no_grad()``, records the hidden states each chosen layer's router will see, and
            initialises that router with :meth:`moga.MoGARouter.from_kmeans` of them (20 iterations, seed 0,
            automatic temperature; with a bias, whatever ``router_bias`` says): its initial argmax is the k-means
            assignment of those tokens, a warm start for training (the router is cast to the layer's dtype: in
            half precision a near-tie may flip). Only with ``router="learned"`` and without context parallelism.
        router_init_tokens: tokens recorded per layer and calibration call (a seeded uniform sample when a call
            has more), which bounds the calibration's memory to calls x layers x tokens x dim values.

    Returns: the same transformer object. Its routers are submodules named ``<layer>.router`` (e.g.
    ``blocks.<i>.attn1.router``), on the device and dtype of that layer's ``to_q``.

    Raises (before anything is changed): TypeError for an unsupported model or a ``router_init`` that is not
    callable, ValueError for bad settings or blocks, blocks already converted, ``router="kmeans"`` with
    ``top_k > 1`` or ``router_init``, or a calibration that reaches a layer with fewer tokens than groups (or not
    at all); NotImplementedError when context parallelism is already enabled on a family without it, or with
    ``router="kmeans"`` or ``router_init``. Errors raised by ``router_init`` itself propagate, the model unchanged.
    """
    family = _family_of(transformer)
    model_name = type(transformer).__name__
    window = check_layer_settings(num_groups, top_k, window, context_frames)
    layers = family.layers(transformer)
    n_layers = len(layers)
    chosen = list(range(n_layers)) if blocks is None else sorted(set(blocks))
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ValueError(f"blocks must hold layer indices in [0, {n_layers}) of {model_name}, got {blocks!r}")
        name, attn = layers[i]
        _check_attention_module(name, attn, model_name)
        if isinstance(attn.processor, MoGAProcessorBase):
            raise ValueError(f"{model_name}.{name} already uses MoGA (apply_moga was called twice on it)")
    parallel_config = getattr(transformer, "_parallel_config", None)
    if parallel_config is not None and not family.context_parallel:
        raise NotImplementedError(
            f"context parallelism is enabled on this {model_name}, and MoGA supports it only for "
            f"{', '.join(n for n, f in _FAMILIES.items() if f.context_parallel)}"
        )
    routers = _new_routers(
        [layers[i] for i in chosen], num_groups, top_k=top_k, router=router, kmeans_iters=kmeans_iters,
        router_bias=router_bias, router_init=router_init, router_init_tokens=router_init_tokens,
        transformer=transformer, parallel=parallel_config is not None,
    )  # fmt: skip

    # Validated: from here on the model is modified.
    state = getattr(transformer, "_moga_video_state", None)
    if state is None:
        state = VideoState()
        params = tuple(inspect.signature(transformer.forward).parameters)
        state.hook = transformer.register_forward_pre_hook(
            _record_video_state(state, family.grid, params), with_kwargs=True
        )
        transformer._moga_video_state = state
    for i, new_router in zip(chosen, routers, strict=True):
        attn = layers[i][1]
        attn.router = new_router
        processor = family.processor(
            state, top_k=top_k, window=window, frame_attention=frame_attention,
            context_frames=context_frames, backend=backend, model_name=model_name, router=router,
        )  # fmt: skip
        # enable_parallelism may have run before apply_moga: it hands its config only to the processors present
        # then, and records it on the model.
        processor._parallel_config = parallel_config
        processor.context_parallel = family.context_parallel
        if hasattr(attn, "set_processor"):
            attn.set_processor(processor)
        else:  # MochiAttention keeps its processor as a plain attribute
            attn.processor = processor
    return transformer


def _new_routers(
    layers: list[tuple[str, nn.Module]],
    num_groups: int,
    *,
    top_k: int,
    router: str,
    kmeans_iters: tuple[int, int],
    router_bias: bool,
    router_init: RouterInit | None,
    router_init_tokens: int,
    transformer: nn.Module,
    parallel: bool,
) -> list[nn.Module]:
    """The router of each chosen layer (name, attention module), built (and for ``router_init`` calibrated on the
    unconverted model) before apply_moga changes anything; every refusal of these options is raised here."""
    if router not in ROUTER_KINDS:
        raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
    if router == "kmeans":
        if top_k != 1:
            raise ValueError(f"router='kmeans' routes each token to its one cluster: it needs top_k=1, got {top_k}")
        if router_init is not None:
            raise ValueError("router_init initialises learned routers: it cannot be combined with router='kmeans'")
        if parallel:
            raise NotImplementedError(
                "router='kmeans' does not support context parallelism (each rank would cluster only its own shard "
                "of the keys)"
            )
        if not (isinstance(kmeans_iters, tuple) and len(kmeans_iters) == 2):
            raise ValueError(f"kmeans_iters must be a (first, warm) tuple of ints, got {kmeans_iters!r}")
        first, warm = kmeans_iters
        return [KMeansRouter(num_groups, iters_first=first, iters_warm=warm) for _ in layers]
    if router_init is not None:
        check_router_init(router_init, router_init_tokens)
        if parallel:
            raise NotImplementedError(
                "router_init does not support context parallelism (each rank would calibrate on its own shard)"
            )
        inputs = record_router_inputs(transformer, layers, router_init, router_init_tokens)
        routers: list[nn.Module] = kmeans_routers(inputs, num_groups)
    else:
        routers = [MoGARouter(attn.to_q.in_features, num_groups, bias=router_bias) for _, attn in layers]
    for (_, attn), r in zip(layers, routers, strict=True):
        r.to(attn.to_q.weight.device, attn.to_q.weight.dtype)
    return routers


def reset_kmeans_clusters(transformer: nn.Module) -> int:
    """Forget the clusters of every ``router="kmeans"`` layer (e.g. before generating a new video): the next call
    of each layer clusters from a cold start. Returns the number of layers reset."""
    routers = [m for m in transformer.modules() if isinstance(m, KMeansRouter)]
    for r in routers:
        r.cache.reset()
    return len(routers)


def moga_processors(transformer: nn.Module) -> list[MoGAProcessorBase]:
    """The MoGA processors of the transformer's attention layers, in module order."""
    return [
        m.processor for m in transformer.modules() if isinstance(getattr(m, "processor", None), MoGAProcessorBase)
    ]


def moga_balance_loss(transformer: nn.Module) -> torch.Tensor:
    """Mean over MoGA layers of the group balance loss of the last forward (multiply by alpha, 0.1)."""
    losses = [p.last_balance_loss for p in moga_processors(transformer) if p.last_balance_loss is not None]
    if not losses:
        raise ValueError("no MoGA layer has run a forward yet (call apply_moga, then the transformer)")
    return torch.stack(losses).mean()
