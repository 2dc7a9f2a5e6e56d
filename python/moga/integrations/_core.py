"""The shared core of the diffusers processors: routing statistics and joint text-video MoGA attention.

Joint (MMDiT) attention runs text and video tokens in one attention. MoGA's semantics there:

* the routed branch and the static branches (STGA, per-frame) act on the video tokens only: the router runs on
  the video tokens, groups and windows hold video tokens;
* text tokens stay global: every segment of every branch also has the row's valid text tokens as keys, so
  every video query attends to its group / window AND to the text; the text queries form one segment per batch
  row whose keys are all valid tokens of the row (video and text);
* padded text tokens (``text_valid`` False) are never keys. As queries they either attend like valid text
  queries (``pad_queries="attend"``, what a key-padding mask does) or output zero (``"zero"``).

Everything is expressed as segment layouts (:class:`moga.layout.SegmentLayout`) over the flattened joint token
rows, so every backend runs it forward and backward with no dense mask. Memory: the key index lists grow by
(number of segments) x (text tokens), never by N^2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moga._checks import check_qkv, softmax_scale_or_default
from moga.distributed.ulysses import gather_sequence, heads_to_sequence, qkv_to_heads
from moga.functional import _segment_outputs
from moga.gate import gated_unpermute
from moga.layout import (
    RoutedLayout,
    SegmentLayout,
    inverse_permutation,
    routed_layout,
    segment_of_positions,
    sort_by_segment,
)
from moga.modules import ROUTER_KINDS, WindowArg, check_grid_and_shots, resolve_window
from moga.router import balance_loss_of_routing, route_tokens
from moga.window import check_context_frames, check_grid, normalize_shot_starts, window_layout

PAD_QUERY_MODES = ("attend", "zero")

# What route_tokens returns: probs (B, n, M), groups (B, n, K), gates (B, n, K). Computed once per layer call and
# shared by the routed branch and routing_stats; the processors do not keep it after the call.
Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class VideoState:
    """What the processors of one transformer need from its current input, set by a forward pre-hook."""

    grid: tuple[int, int, int] | None = None
    shot_starts: Sequence[int] | None = None
    frames_per_block: int = 1  # > 1: the model's self-attention is block-causal over frames (SkyReels-V2)
    hook: Any = field(default=None, repr=False)


class MoGAProcessorBase:
    """What every MoGA attention processor of :mod:`moga.integrations.diffusers` shares: its settings, the video
    state of its transformer, and the routing statistics of its last call.

    After each call ``last_balance_loss`` is this layer's group balance loss (paper form, without alpha) and
    ``last_group_fraction`` (M,) the fraction of video tokens routed to each group (detached).

    ``router``: "learned" (``attn.router`` is a :class:`moga.MoGARouter` on the layer's input hidden states) or
    "kmeans" (``attn.router`` is a :class:`moga.kmeans.KMeansRouter` on the layer's video keys: training-free
    groups, gate 1, clusters re-used across calls).
    """

    # Read by diffusers: enable_parallelism sets _parallel_config on processors that have the attribute, and
    # checks the attention backend of the first processor that declares one (None: the active backend).
    _attention_backend = None
    _parallel_config = None
    context_parallel = False  # set by apply_moga: whether this family runs under diffusers' context parallelism

    def __init__(
        self,
        state: VideoState,
        *,
        top_k: int,
        window: WindowArg,
        frame_attention: bool,
        context_frames: int,
        backend: str,
        model_name: str = "",
        router: str = "learned",
    ) -> None:
        if router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {router!r}")
        self.router_kind = router
        self.state = state
        self.top_k = top_k
        self.window = window
        self.frame_attention = frame_attention
        self.context_frames = context_frames
        self.backend = backend
        self.model_name = model_name
        self.last_balance_loss: torch.Tensor | None = None
        self.last_group_fraction: torch.Tensor | None = None

    def _router_logits(self, attn: nn.Module, hidden_states: torch.Tensor, video_keys: torch.Tensor) -> torch.Tensor:
        """(B, n, M) router logits of the video tokens: ``attn.router(hidden_states)`` for a learned router, or
        the k-means router on ``video_keys`` (B, n, H, D) (heads concatenated: one clustering shared by all heads,
        after the QK norm and rotary embedding), which refuses diffusers' context parallelism (a rank would cluster
        only its own shard of the keys)."""
        if self.router_kind == "kmeans":
            self._refuse_context_parallel()
            return attn.router(video_keys.flatten(2))
        return attn.router(hidden_states)

    def _record_routing(self, logits: torch.Tensor, routing: Routing) -> None:
        """The statistics of ``routing``, the attention path's ``route_tokens(logits, top_k)`` (not routed again)."""
        self.last_balance_loss, self.last_group_fraction = routing_stats(logits, self.top_k, routing=routing)

    def _refuse_context_parallel(self) -> None:
        """For processors without sequence parallelism: fail clearly if diffusers' context parallelism is on."""
        cp = getattr(self._parallel_config, "context_parallel_config", None)
        if cp is not None and ((cp.ulysses_degree or 1) > 1 or (cp.ring_degree or 1) > 1):
            raise NotImplementedError(
                f"{type(self).__name__} does not support diffusers' context parallelism on {self.model_name}"
                + (" with its block-causal mask" if self.state.frames_per_block > 1 else "")
                + (" with router='kmeans'" if self.router_kind == "kmeans" else "")
                + " (docs/integrations.md lists what does)"
            )

    def _layer_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logits: torch.Tensor, block_causal: bool = False
    ) -> torch.Tensor:
        """Self-attention of video tokens: :func:`moga.modules.moga_layer_attention` with this processor's settings,
        under diffusers' Ulysses context parallelism when it is on; records the routing statistics. The logits are
        routed once (:func:`routed_layer_attention`): the routed branch and :func:`routing_stats` share the routing,
        which is dropped when the call returns (nothing is kept across calls).

        q, k, v (B, n, H, D) and logits (B, n, M) are this rank's contiguous token shard (n = N without
        parallelism). Under parallelism q, k, v move to head shards (one all-to-all), the logits are gathered, every
        branch runs on the whole sequence for H/P heads, and one all-to-all brings the output back; the statistics
        are the whole sequence's, with gradient to this rank's tokens only. Returns (B, n, H, D).

        ``block_causal``: the model asked for its block-causal mask (SkyReels-V2, ``state.frames_per_block > 1``):
        every branch is restricted to keys of the same or earlier frame blocks
        (:func:`moga.integrations._block_causal.block_causal_layer_attention`).
        """
        if not self.context_parallel or block_causal:
            self._refuse_context_parallel()
        settings = dict(
            top_k=self.top_k, window=self.window, frame_attention=self.frame_attention,
            shot_starts=self.state.shot_starts, context_frames=self.context_frames, backend=self.backend,
        )  # fmt: skip
        if block_causal:
            # imported here: _block_causal builds on this module's _branch_mean
            from moga.integrations._block_causal import block_causal_layer_attention

            routing = route_tokens(logits, self.top_k)  # once: the routed branch and the statistics share it
            out = block_causal_layer_attention(
                q, k, v, logits, frames_per_block=self.state.frames_per_block, grid=self.state.grid,
                routing=routing, **settings,
            )  # fmt: skip
            self._record_routing(logits, routing)
            return out
        group = _ulysses_group(self._parallel_config)
        if group is None:
            routing = route_tokens(logits, self.top_k)
            out = routed_layer_attention(q, k, v, routing, grid=self.state.grid, **settings)
            self._record_routing(logits, routing)  # ties go to the lower group, as moga_attention routes
            return out
        # Sequence shards -> head shards: every rank sees all N tokens of its H/P heads and routes all of them.
        q, k, v = qkv_to_heads(q, k, v, group)
        full_logits = gather_sequence(logits, group)
        probs, groups, gates = route_tokens(full_logits, self.top_k)
        out = routed_layer_attention(q, k, v, (probs, groups, gates), grid=self.state.grid, **settings)
        out = heads_to_sequence(out, group)
        # The statistics are the whole sequence's, with gradient to this rank's tokens only, as before: the local
        # rows' probabilities are this shard's softmax (the same values; (B, N/P, M), no second routing), the
        # others detached, so the loss's backward needs no collective.
        local_probs = torch.softmax(logits.to(probs.dtype), dim=-1)
        self._record_routing(full_logits, (_with_local_grad(probs, local_probs, group), groups, gates))
        return out


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


def routing_stats(
    logits: torch.Tensor, top_k: int, *, routing: Routing | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group balance loss (paper form, without alpha) of a routing and the fraction of tokens routed to each
    group (M,) (detached; ties go to the lower group, as :func:`moga.moga_attention` routes).

    Args:
        logits: (B, N, M) router logits.
        top_k: groups per token.
        routing: ``route_tokens(logits, top_k)`` when the caller has it (the attention path's): not routed again.
            The loss's gradient flows through its probs.

    Returns: the loss, equal to ``moga.group_balance_loss(logits, top_k, form="paper")`` (the same operations on
    the same probabilities), and the fraction (M,) float32.
    """
    probs, groups, _ = _routing_of(logits, top_k, routing)
    M = logits.shape[-1]
    n = max(logits.shape[0] * logits.shape[1], 1)
    loss = balance_loss_of_routing(probs, groups, form="paper")
    with torch.no_grad():
        flat = groups.reshape(-1)
        counts = torch.zeros(M, device=logits.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        fraction = counts / n
    return loss, fraction


def _routing_of(logits: torch.Tensor, top_k: int, routing: Routing | None) -> Routing:
    """A caller's ``routing`` of ``logits`` (B, n, M), shape-checked (:func:`_check_routing`), or
    ``route_tokens(logits, top_k)`` when it is None."""
    if routing is None:
        return route_tokens(logits, top_k)
    _check_routing(routing, logits.shape, top_k)
    return routing


def _check_routing(routing: Routing, logits_shape: Sequence[int], top_k: int) -> None:
    """A caller's ``routing`` must have the shapes of ``route_tokens(logits, top_k)`` for logits of ``logits_shape``
    (host checks only)."""
    probs, groups, gates = routing
    want = (*logits_shape[:-1], top_k)
    if tuple(probs.shape) != tuple(logits_shape) or groups.shape != want or gates.shape != want:
        raise ValueError(
            f"routing must be route_tokens(logits, {top_k}) for logits {tuple(logits_shape)}: got probs "
            f"{tuple(probs.shape)}, groups {tuple(groups.shape)}, gates {tuple(gates.shape)}"
        )


def routed_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    *,
    top_k: int,
    grid: Sequence[int] | None = None,
    window: WindowArg = None,
    frame_attention: bool = False,
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`moga.modules.moga_layer_attention` (no sequence parallelism, no padding, default softmax scale) on a
    routing the caller computed (``route_tokens(router_logits, top_k)``), so that it can reuse it; the same
    numbers.

    Args: q (B, N, Hq, D); k, v (B, N, Hkv, D); routing: probs (B, N, M), groups and gates (B, N, top_k); the
        rest as in :func:`moga.modules.moga_layer_attention`. Returns: (B, N, Hq, D) in the dtype of q.
    """
    B, N, _, _, D = check_qkv(q, k, v)
    _check_routing(routing, (B, N, routing[0].shape[-1]), top_k)
    grid, shots = check_grid_and_shots(grid, shot_starts, N, static=window is not None or frame_attention)
    return _branch_mean(
        q, k, v, routing, lambda layout: layout, top_k=top_k, grid=grid, window=window,
        frame_attention=frame_attention, shots=shots, context_frames=check_context_frames(context_frames),
        scale=softmax_scale_or_default(None, D), backend=backend,
    )  # fmt: skip


def _video_rows(rows: torch.Tensor, num_video: int, num_tokens: int, video_offset: int) -> torch.Tensor:
    """Token rows of a video-only layout (row b * Nv + i) -> rows of the joint sequence (b * N + offset + i)."""
    return torch.div(rows, num_video, rounding_mode="floor") * num_tokens + video_offset + rows % num_video


def _block_rows(batch: int, num_tokens: int, offset: int, length: int, device: torch.device) -> torch.Tensor:
    """(B, length) joint-sequence rows of a contiguous block of tokens (text or video) starting at ``offset``."""
    b = torch.arange(batch, device=device, dtype=torch.int64).view(batch, 1)
    return b * num_tokens + offset + torch.arange(length, device=device, dtype=torch.int64).view(1, length)


def with_global_keys(
    layout: RoutedLayout,
    *,
    batch: int,
    num_video: int,
    num_text: int,
    video_first: bool,
    text_valid: torch.Tensor | None,
) -> RoutedLayout:
    """A video-only self-attention layout (segments of B * Nv video rows, segment s in batch row
    ``s // (S / B)``) moved onto the joint sequence, with the row's valid text tokens appended to the keys of every
    segment. Query positions (and ``position``) are unchanged. No host synchronisation: excluded entries
    (padding) are sorted past the last segment.
    """
    seg = layout.segments
    N = num_video + num_text
    video_offset, text_offset = (0, num_video) if video_first else (num_text, 0)
    device = seg.q_index.device
    S = seg.num_segments
    q_index = _video_rows(seg.q_index, num_video, N, video_offset)
    own_rows = _video_rows(seg.k_index, num_video, N, video_offset)
    own_keys = segment_of_positions(seg.k_offsets, seg.k_index.numel())
    text_rows = _block_rows(batch, N, text_offset, num_text, device)  # (B, Nt)
    seg_row = torch.arange(S, device=device, dtype=torch.int64) // (S // batch)  # batch row of each segment
    extra_rows = text_rows[seg_row]  # (S, Nt)
    extra_keys = torch.arange(S, device=device, dtype=torch.int64).view(S, 1).expand(S, num_text)
    if text_valid is not None:
        extra_keys = torch.where(text_valid[seg_row], extra_keys, torch.full_like(extra_keys, -1))
    keys = torch.cat([own_keys, extra_keys.reshape(-1)])
    rows = torch.cat([own_rows, extra_rows.reshape(-1)])
    order, k_offsets = sort_by_segment(keys, S)  # stable: a segment's own keys stay before the text keys
    segments = SegmentLayout(
        q_index=q_index, q_offsets=seg.q_offsets, k_index=rows[order], k_offsets=k_offsets,
        num_tokens=batch * N, q_unique=seg.q_unique, k_unique=False, max_q_len=seg.max_q_len,
        max_k_len=None if seg.max_k_len is None else seg.max_k_len + num_text,
    )  # fmt: skip
    return replace(layout, segments=segments)


def text_query_layout(
    *,
    batch: int,
    num_video: int,
    num_text: int,
    video_first: bool,
    text_valid: torch.Tensor | None,
    pad_queries: str,
    device: torch.device,
) -> RoutedLayout:
    """One segment per batch row: queries its text tokens, keys all its valid tokens (video and text).
    ``position`` maps the B * Nt text entries (row-major) to their query positions."""
    N = num_video + num_text
    video_offset, text_offset = (0, num_video) if video_first else (num_text, 0)
    b = torch.arange(batch, device=device, dtype=torch.int64).view(batch, 1)
    text_rows = _block_rows(batch, N, text_offset, num_text, device)
    video_rows = _block_rows(batch, N, video_offset, num_video, device)
    q_keys = b.expand(batch, num_text)
    t_keys = b.expand(batch, num_text)
    if text_valid is not None:
        t_keys = torch.where(text_valid, t_keys, torch.full_like(t_keys, -1))
        if pad_queries == "zero":
            q_keys = torch.where(text_valid, q_keys, torch.full_like(q_keys, -1))
    q_order, q_offsets = sort_by_segment(q_keys.reshape(-1), batch)
    k_rows = torch.cat([video_rows, text_rows], dim=1).reshape(-1)
    k_keys = torch.cat([b.expand(batch, num_video), t_keys], dim=1).reshape(-1)
    k_order, k_offsets = sort_by_segment(k_keys, batch)
    position = inverse_permutation(q_order)
    segments = SegmentLayout(
        q_index=text_rows.reshape(-1)[q_order], q_offsets=q_offsets, k_index=k_rows[k_order], k_offsets=k_offsets,
        num_tokens=batch * N, q_unique=True, k_unique=True, max_q_len=num_text, max_k_len=N,
    )  # fmt: skip
    return RoutedLayout(segments=segments, position=position, top_k=1)


def _branch_mean(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    adapt: Callable[[RoutedLayout], RoutedLayout],
    *,
    top_k: int,
    grid: tuple[int, int, int] | None,
    window: WindowArg,
    frame_attention: bool,
    shots: Sequence[int] | None,
    context_frames: int,
    scale: float,
    backend: str,
    static_layout: Callable[..., RoutedLayout] | None = None,
) -> torch.Tensor:
    """The mean of MoGA's branches over the video tokens, every branch's self-attention layout passed through
    ``adapt`` (moved onto a joint sequence, restricted to block-causal keys, ...) before it runs.

    Args:
        q, k, v: (B, N', H, D) (k, v may have fewer heads), the rows ``adapt``'s layouts index.
        routing: ``route_tokens(router_logits, top_k)`` of the router on the n video tokens, (B, n, M) probs.
        adapt: maps a layout over the B * n video rows (routed groups, STGA windows, frames) to the layout run.
        top_k, window, frame_attention, context_frames, backend: as in :func:`moga.modules.moga_layer_attention`.
        grid: (T, H, W) of the video tokens, checked by the caller (needed when window or frame_attention is set).
        shots: the normalised shot starts (needed when window or frame_attention is set).
        scale: the softmax scale.
        static_layout: builds the layout run by a static branch, called as ``static_layout(grid, window, shots,
            context_frames, device, B)`` (a cached builder when ``adapt`` is a function of these alone); None:
            ``adapt(window_layout(...))``.

    Returns: (B, n, H, D) in the dtype of q, the branches averaged in float32 (or q's dtype if wider).
    """
    _, groups, gates = routing
    B, n, M = routing[0].shape
    routed = adapt(routed_layout(groups, M))
    out_seg = _segment_outputs(q, k, v, routed, scale, backend)
    branches = [gated_unpermute(out_seg, routed.position, gates.reshape(B * n, top_k))]
    windows = []
    if window is not None:
        windows.append((resolve_window(window, grid), check_context_frames(context_frames)))
    if frame_attention:
        windows.append(((1, grid[1], grid[2]), 0))
    if static_layout is None:
        build = window_layout.__wrapped__ if torch.compiler.is_compiling() else window_layout

        def static_layout(*args) -> RoutedLayout:
            return adapt(build(*args))

    for win, ctx in windows:
        layout = static_layout(grid, win, shots, ctx, q.device, B)
        branches.append(_segment_outputs(q, k, v, layout, scale, backend)[layout.position])
    if len(branches) == 1:  # the routed branch alone, as moga_attention returns it (a float32 mean of one branch
        return branches[0].to(q.dtype).view(B, n, q.shape[2], q.shape[3])  # would hold up to 4 more copies of it)
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    out = sum(b.to(acc_dtype) for b in branches) / len(branches)  # (B * n, H, D)
    return out.to(q.dtype).view(B, n, q.shape[2], q.shape[3])


def joint_moga_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    num_text: int,
    video_first: bool,
    text_valid: torch.Tensor | None = None,
    pad_queries: str = "attend",
    top_k: int = 1,
    grid: Sequence[int] | None = None,
    window: WindowArg = None,
    frame_attention: bool = False,
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
    softmax_scale: float | None = None,
    backend: str = "auto",
    routing: Routing | None = None,
) -> torch.Tensor:
    """MoGA on a joint text-video sequence (semantics in the module docstring).

    Args:
        q, k, v: (B, N, H, D), N = Nv + Nt: video tokens then text tokens (``video_first``) or text then video.
        router_logits: (B, Nv, M), the router on the video tokens.
        num_text: Nt.
        text_valid: (B, Nt) bool, False marks padded text; None: all valid.
        pad_queries: what a padded text query does: ``"attend"`` (like a valid one) or ``"zero"`` (output 0).
        top_k, grid, window, frame_attention, shot_starts, context_frames, softmax_scale, backend: as in
            :func:`moga.modules.moga_layer_attention`; grid describes the video tokens.
        routing: ``route_tokens(router_logits, top_k)`` when the caller has it (to reuse it); None: routed here.

    Returns: (B, N, H, D) in the dtype of q: video rows the mean of the branches, text rows global attention.
    """
    B, N, H, D = q.shape
    Nv = N - num_text
    if Nv < 1 or num_text < 0:
        raise ValueError(f"joint sequence of {N} tokens cannot hold {num_text} text tokens and some video")
    if router_logits.shape[:2] != (B, Nv):
        raise ValueError(f"router_logits must be (B, Nv, M) = ({B}, {Nv}, M), got {tuple(router_logits.shape)}")
    if text_valid is not None and (text_valid.shape != (B, num_text) or text_valid.dtype != torch.bool):
        raise ValueError(f"text_valid must be a ({B}, {num_text}) bool tensor, got {text_valid.dtype} "
                         f"{tuple(text_valid.shape)}")  # fmt: skip
    if pad_queries not in PAD_QUERY_MODES:
        raise ValueError(f"pad_queries must be one of {PAD_QUERY_MODES}, got {pad_queries!r}")
    static = window is not None or frame_attention
    if static:
        if grid is None:
            raise ValueError("grid=(T, H, W) of the video tokens is required when window or frame_attention is set")
        grid = check_grid(grid, Nv)
    scale = softmax_scale_or_default(softmax_scale, D)
    joint = dict(batch=B, num_video=Nv, num_text=num_text, video_first=video_first, text_valid=text_valid)

    shots = normalize_shot_starts(shot_starts, grid[0]) if static else None
    routing = _routing_of(router_logits, top_k, routing)
    video = _branch_mean(
        q, k, v, routing, lambda layout: with_global_keys(layout, **joint), top_k=top_k, grid=grid,
        window=window, frame_attention=frame_attention, shots=shots, context_frames=context_frames, scale=scale,
        backend=backend,
    )  # fmt: skip
    if num_text == 0:
        return video
    text_layout = text_query_layout(**joint, pad_queries=pad_queries, device=q.device)
    text = _segment_outputs(q, k, v, text_layout, scale, backend)[text_layout.position].view(B, num_text, H, D)
    return torch.cat([video, text], dim=1) if video_first else torch.cat([text, video], dim=1)
