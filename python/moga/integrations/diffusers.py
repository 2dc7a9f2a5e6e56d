"""Drop-in MoGA for diffusers' Wan 2.1 transformer (``diffusers.WanTransformer3DModel``).

:func:`apply_moga` swaps the attention processor of each chosen block's self-attention (``attn1``) for
:class:`MoGAWanAttnProcessor` and registers a router on that attention module (``blocks.<i>.attn1.router``), so
the pretrained q/k/v/out weights and QK-norms are reused unchanged and the routers train and save with the
model. Cross-attention (``attn2``) is left alone.

The static branches need the post-patchify grid (T, H, W): a forward pre-hook on the transformer records it
from the input latents (``(frames, height, width) // patch_size``) on every call. Shot boundaries (latent
frames, after patchify) are passed as ``attention_kwargs={"shot_starts": [...]}`` to the transformer call.

Sequence parallelism: after ``apply_moga``, diffusers' own context parallelism
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))``) works unchanged. diffusers
hands each MoGA processor its rank's contiguous shard of the tokens; the processor then runs Ulysses itself
(:mod:`moga.distributed`): one all-to-all of q, k, v to head shards, an all-gather of the router logits, the routed
and static branches over the full sequence for its H/P heads, and an all-to-all back. Outputs match a single
process; each rank's parameter gradients are the part of its own tokens (summed over the CP group they equal the
single-process gradients), for the routers exactly as for every other weight. Ring attention is not supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moga.distributed.ulysses import gather_sequence, heads_to_sequence, qkv_to_heads
from moga.modules import WindowArg, apply_rotary_interleaved, check_layer_settings, moga_layer_attention
from moga.router import MoGARouter, group_balance_loss, route_tokens

SHOT_STARTS_KEY = "shot_starts"


@dataclass
class VideoState:
    """What the processors of one transformer need from its current input, set by a forward pre-hook."""

    grid: tuple[int, int, int] | None = None
    shot_starts: Sequence[int] | None = None
    hook: Any = field(default=None, repr=False)


class MoGAWanAttnProcessor:
    """Processor for a Wan self-attention module (``WanAttention`` with ``router`` attached by apply_moga).

    Projections, QK RMSNorm and rotary embedding are applied exactly as ``diffusers.WanAttnProcessor``
    does (rotary before routing); then the routed branch and the enabled static branches run on the shared
    q, k, v (see :func:`moga.modules.moga_layer_attention`) and ``to_out`` projects the mean.

    After each call ``last_balance_loss`` is this layer's group balance loss (paper form, without alpha) and
    ``last_group_fraction`` (M,) the fraction of tokens routed to each group (detached). Under diffusers'
    context parallelism both are those of the whole sequence, identical on every rank; the balance loss's gradient
    reaches only this rank's tokens (summed over ranks it is the single-process gradient).
    """

    # Read by diffusers: enable_parallelism sets _parallel_config on processors that have the attribute, and
    # checks the attention backend of the first processor that declares one (None: the active backend).
    _attention_backend = None
    _parallel_config = None

    def __init__(
        self,
        state: VideoState,
        *,
        top_k: int,
        window: WindowArg,
        frame_attention: bool,
        context_frames: int,
        backend: str,
    ) -> None:
        self.state = state
        self.top_k = top_k
        self.window = window
        self.frame_attention = frame_attention
        self.context_frames = context_frames
        self.backend = backend
        self.last_balance_loss: torch.Tensor | None = None
        self.last_group_fraction: torch.Tensor | None = None

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
        if attention_mask is not None:
            raise ValueError("MoGAWanAttnProcessor does not support attention_mask (Wan's self-attention has none)")
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

        logits = attn.router(hidden_states)  # (B, n, M): this rank's tokens under context parallelism
        group = _ulysses_group(self._parallel_config)
        if group is not None:
            # Sequence shards -> head shards: every rank sees all N tokens of its H/P heads.
            query, key, value = qkv_to_heads(query, key, value, group)
            full_logits = gather_sequence(logits, group)
        else:
            full_logits = logits
        out = moga_layer_attention(
            query, key, value, full_logits, top_k=self.top_k, grid=self.state.grid, window=self.window,
            frame_attention=self.frame_attention, shot_starts=self.state.shot_starts,
            context_frames=self.context_frames, backend=self.backend,
        )
        if group is not None:
            out = heads_to_sequence(out, group)
            logits = _with_local_grad(full_logits, logits, group)
        self.last_balance_loss = group_balance_loss(logits, self.top_k, form="paper")
        with torch.no_grad():
            # The routing moga_attention used (ties to the lower group), not torch.topk's tie order.
            groups = route_tokens(logits, self.top_k)[1].reshape(-1)
            counts = torch.zeros(logits.shape[-1], device=logits.device).index_add_(
                0, groups, torch.ones_like(groups, dtype=torch.float32)
            )
            self.last_group_fraction = counts / max(logits.shape[0] * logits.shape[1], 1)

        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _ulysses_group(parallel_config: Any) -> Any:
    """The Ulysses process group of diffusers' context parallelism, or None when it is off (or of degree 1)."""
    cp = getattr(parallel_config, "context_parallel_config", None)
    if cp is None:
        return None
    if (cp.ring_degree or 1) > 1:
        raise NotImplementedError(
            f"MoGA supports diffusers' Ulysses context parallelism only, got ring_degree={cp.ring_degree}: a routed "
            "group spans the whole sequence, so use ContextParallelConfig(ulysses_degree=P)"
        )
    if getattr(cp, "ulysses_anything", False):
        raise NotImplementedError("MoGA needs equal sequence shards: ulysses_anything=True is not supported")
    if (cp.ulysses_degree or 1) == 1:
        return None
    return cp._ulysses_mesh.get_group()


def _with_local_grad(full: torch.Tensor, local: torch.Tensor, group: Any) -> torch.Tensor:
    """``full`` (B, N, M), the gathered logits, with this rank's slice replaced by ``local`` (B, N/P, M) and the
    rest detached: a loss on it has the full sequence's value and sends gradient to this rank's tokens only."""
    n, rank = local.shape[1], dist.get_rank(group)
    rest = full.detach()
    return torch.cat([rest[:, : rank * n], local, rest[:, (rank + 1) * n :]], dim=1)


def _record_video_state(state: VideoState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        p_t, p_h, p_w = module.config.patch_size
        _, _, frames, height, width = latents.shape
        state.grid = (frames // p_t, height // p_h, width // p_w)
        attention_kwargs = kwargs.get("attention_kwargs") or {}
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
) -> nn.Module:
    """Replace the self-attention of Wan transformer blocks with MoGA, in place.

    Args:
        transformer: a ``diffusers.WanTransformer3DModel``.
        num_groups: M, groups of the routed branch (M = 1 with no static branch leaves the output unchanged).
        window: STGA window, fixed (wt, wh, ww) in post-patchify tokens or a :class:`moga.WindowSplit`
            (e.g. ``moga.paper_config("wan").window``); None: no STGA branch.
        frame_attention: add the per-frame branch.
        top_k: groups per token.
        blocks: indices of the blocks to convert; all blocks by default.
        context_frames: cross-shot context frames of the STGA branch (shots come from
            ``attention_kwargs={"shot_starts": [...]}`` at call time).
        router_bias: bias of the new routers (initialised by ``nn.Linear``'s default).
        backend: segment-attention backend.

    Returns: the same transformer object. Its routers are submodules named ``blocks.<i>.attn1.router``, on
    the device and dtype of that block's ``to_q``.
    """
    if not hasattr(transformer, "blocks") or not hasattr(getattr(transformer, "config", None), "patch_size"):
        raise TypeError(f"transformer must be a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    window = check_layer_settings(num_groups, top_k, window, context_frames)
    n_blocks = len(transformer.blocks)
    chosen = list(range(n_blocks)) if blocks is None else sorted(set(blocks))
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks:
            raise ValueError(f"blocks must hold block indices in [0, {n_blocks}), got {blocks!r}")
        if isinstance(transformer.blocks[i].attn1.processor, MoGAWanAttnProcessor):
            raise ValueError(f"block {i} already uses MoGA (apply_moga was called twice on it)")

    state = getattr(transformer, "_moga_video_state", None)
    if state is None:
        state = VideoState()
        state.hook = transformer.register_forward_pre_hook(_record_video_state(state), with_kwargs=True)
        transformer._moga_video_state = state
    for i in chosen:
        attn = transformer.blocks[i].attn1
        ref = attn.to_q.weight
        attn.router = MoGARouter(attn.to_q.in_features, num_groups, bias=router_bias).to(ref.device, ref.dtype)
        processor = MoGAWanAttnProcessor(
            state, top_k=top_k, window=window, frame_attention=frame_attention,
            context_frames=context_frames, backend=backend,
        )  # fmt: skip
        # enable_parallelism may have run before apply_moga: it hands its config only to the processors present
        # then, and records it on the model.
        processor._parallel_config = getattr(transformer, "_parallel_config", None)
        attn.set_processor(processor)
    return transformer


def moga_processors(transformer: nn.Module) -> list[MoGAWanAttnProcessor]:
    """The MoGA processors of the transformer's blocks, in block order."""
    return [b.attn1.processor for b in transformer.blocks if isinstance(b.attn1.processor, MoGAWanAttnProcessor)]


def moga_balance_loss(transformer: nn.Module) -> torch.Tensor:
    """Mean over MoGA layers of the group balance loss of the last forward (multiply by alpha, 0.1)."""
    losses = [p.last_balance_loss for p in moga_processors(transformer) if p.last_balance_loss is not None]
    if not losses:
        raise ValueError("no MoGA layer has run a forward yet (call apply_moga, then the transformer)")
    return torch.stack(losses).mean()
