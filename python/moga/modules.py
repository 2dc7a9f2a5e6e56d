"""The MoGA attention layer (paper Sec. 3): routed group attention averaged with the static branches.

A layer computes q, k, v once and feeds them to up to three branches:

* the gated global branch, :func:`moga.moga_attention` with a learned router on the layer input;
* STGA, spatio-temporal window attention with optional cross-shot context frames (:mod:`moga.window`);
* per-frame attention (window (1, H, W)).

The layer output is the mean of the branches it has, followed by the output projection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from moga._checks import check_num_groups, check_top_k
from moga.functional import moga_attention
from moga.kmeans import KMeansRouter
from moga.router import MoGARouter, group_balance_loss
from moga.window import Grid, check_context_frames, check_grid, check_window, normalize_shot_starts, window_attention

QK_NORM_EPS = 1e-6  # Wan 2.1's RMSNorm eps on the q/k projections
ROUTER_KINDS = ("learned", "kmeans")  # the routers a MoGA layer (and apply_moga) can use


@dataclass(frozen=True)
class WindowSplit:
    """A window given as a split of each frame: ``rows x cols`` spatial windows, ``frames`` frames deep.

    The paper states STGA windows this way ("2x2 windows per frame"), so the window size follows the
    resolution: ``resolve((T, H, W)) == (frames, ceil(H / rows), ceil(W / cols))``.
    """

    frames: int
    rows: int
    cols: int

    def __post_init__(self) -> None:
        check_window((self.frames, self.rows, self.cols))

    def resolve(self, grid: Grid) -> Grid:
        _, H, W = grid
        return self.frames, -(-H // self.rows), -(-W // self.cols)


WindowArg = WindowSplit | Sequence[int] | None


def resolve_window(window: WindowArg, grid: Grid) -> Grid:
    """(wt, wh, ww) for this grid from a :class:`WindowSplit` or a fixed window."""
    if isinstance(window, WindowSplit):
        return window.resolve(grid)
    return check_window(window)


def check_layer_settings(num_groups: int, top_k: int, window: WindowArg, context_frames: int) -> WindowArg:
    """Validate the settings a MoGA layer shares with :func:`moga.integrations.diffusers.apply_moga`; returns the
    window normalised (a :class:`WindowSplit` as given, a fixed window checked into a tuple, or None)."""
    check_num_groups(num_groups, allow_none=False)
    check_top_k(top_k, num_groups)
    if window is not None and not isinstance(window, WindowSplit):
        window = check_window(window)
    check_context_frames(context_frames)
    return window


@dataclass(frozen=True)
class MoGAConfig:
    """The paper's MoGA settings for one model family (see :func:`paper_config`).

    Attributes:
        num_groups: M, groups of the routed branch.
        window: the STGA window as a split of each frame (temporal extent: our choice, the paper gives none).
        frame_attention: whether the per-frame branch is on.
        context_frames: latent frames of each adjacent shot added to STGA keys/values.
        top_k: groups per token (the paper routes top-1).
        balance_loss_weight: alpha, the weight of the group balance loss.
    """

    num_groups: int
    window: WindowSplit
    frame_attention: bool = True
    context_frames: int = 2
    top_k: int = 1
    balance_loss_weight: float = 0.1


def paper_config(model: str = "wan") -> MoGAConfig:
    """The paper's settings: ``"wan"`` (Wan 2.1: M = 5, 2x2 windows per frame) or ``"mmdit"`` (M = 20, 4x4).

    The temporal extent of a window is not in the paper; we use about 10 s of video (40 latent frames for
    Wan at 16 fps, 60 for the 24 fps MMDiT model). docs/static_branches.md explains the choice.
    """
    if model == "wan":
        return MoGAConfig(num_groups=5, window=WindowSplit(frames=40, rows=2, cols=2))
    if model == "mmdit":
        return MoGAConfig(num_groups=20, window=WindowSplit(frames=60, rows=4, cols=4))
    raise ValueError(f"model must be 'wan' or 'mmdit', got {model!r}")


def apply_rotary_interleaved(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved channel pairs, exactly as diffusers' Wan attention processor.

    Args:
        x: (B, N, H, D); channels (2i, 2i+1) form pair i.
        freqs_cos, freqs_sin: broadcastable to (B, N, H, D), each pair's value repeated twice (Wan's
            ``WanRotaryPosEmbed`` returns them as (1, N, 1, D), float64 on most devices).
    Returns: (B, N, H, D) in the dtype of x.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def check_grid_and_shots(
    grid: Sequence[int] | None, shot_starts: Sequence[int] | torch.Tensor | None, num_tokens: int, *, static: bool
) -> tuple[Grid | None, tuple[int, ...] | None]:
    """The grid and shot starts of a MoGA layer, checked as :func:`moga_layer_attention` documents them.

    Args: grid (T, H, W) or None, T * H * W must be ``num_tokens``; shot_starts (needs grid); static: whether a
        static branch is on (it needs grid).

    Returns: the checked grid and the normalised shot starts (:func:`moga.window.normalize_shot_starts`), or
    (None, None) without a grid.
    """
    if static and grid is None:
        raise ValueError("grid=(T, H, W) is required when window or frame_attention is set")
    if grid is None:
        if shot_starts is not None:
            raise ValueError("shot_starts are frames of the latent grid: pass grid=(T, H, W) with them")
        return None, None
    # Checked even when no static branch uses it: a grid that does not describe the sequence is a mistake.
    grid = check_grid(grid, num_tokens)
    return grid, normalize_shot_starts(shot_starts, grid[0])


def moga_layer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    *,
    top_k: int = 1,
    grid: Sequence[int] | None = None,
    window: WindowArg = None,
    frame_attention: bool = False,
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
    softmax_scale: float | None = None,
    backend: str = "auto",
    sequence_parallel_group: object | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of the gated MoGA branch and the enabled static branches on shared q, k, v.

    Args:
        q: (B, N, Hq, D); k, v: (B, N, Hkv, D); router_logits: (B, N, M).
        grid: (T, H, W) with T * H * W == N (the whole sequence's N with ``sequence_parallel_group``);
            required when a static branch is on, checked whenever given.
        window: STGA window, fixed (wt, wh, ww) or a :class:`WindowSplit`; None disables STGA.
        frame_attention: add the per-frame branch (window (1, H, W), no context frames).
        shot_starts, context_frames: see :func:`moga.window_attention` (context applies to STGA only);
            shot_starts needs grid and is checked against its T whenever given.
        sequence_parallel_group: a process group of P ranks: q, k, v and router_logits are this rank's
            contiguous shard (B, N/P, ...) and so is the result (DeepSpeed-Ulysses). Without static branches
            this is :func:`moga.distributed.ulysses_moga_attention`; with them, q, k, v are moved to head
            shards once and every branch runs on the whole sequence. ``grid`` describes the whole sequence.
            Hq and Hkv must be divisible by P.
        valid: (B, N) bool or None; False marks padding: neither a query nor a key of any branch, output 0
            (see :func:`moga.moga_attention`). Not supported with ``sequence_parallel_group``.

    Returns: (B, N, Hq, D), dtype of q.
    """
    static = window is not None or frame_attention
    if valid is not None and sequence_parallel_group is not None:
        raise NotImplementedError("valid (padding) is not supported with sequence_parallel_group")
    num_tokens = q.shape[1]
    if grid is not None and sequence_parallel_group is not None:
        import torch.distributed as dist  # optional dependency, only with sequence parallelism

        num_tokens *= dist.get_world_size(sequence_parallel_group)
    grid, shot_starts = check_grid_and_shots(grid, shot_starts, num_tokens, static=static)
    if sequence_parallel_group is not None:
        # Imported lazily: torch.distributed is optional.
        from moga.distributed import gather_sequence, heads_to_sequence, qkv_to_heads, ulysses_moga_attention

        if not static:
            return ulysses_moga_attention(
                q, k, v, router_logits, top_k=top_k, softmax_scale=softmax_scale, group=sequence_parallel_group,
                backend=backend,
            )
        # Ulysses for the whole layer: q, k, v move to head shards once and all branches share them (windows
        # and frames need every token of the sequence); one all-to-all brings the mean back.
        group = sequence_parallel_group
        q_h, k_h, v_h = qkv_to_heads(q, k, v, group)  # one packed all-to-all for the three tensors
        out_h = moga_layer_attention(
            q_h, k_h, v_h, gather_sequence(router_logits, group), top_k=top_k, grid=grid, window=window,
            frame_attention=frame_attention, shot_starts=shot_starts, context_frames=context_frames,
            softmax_scale=softmax_scale, backend=backend,
        )
        return heads_to_sequence(out_h, group)
    out = moga_attention(
        q, k, v, router_logits, top_k=top_k, softmax_scale=softmax_scale, backend=backend, valid=valid
    )
    if not static:
        return out
    branches = [out]
    if window is not None:
        branches.append(
            window_attention(
                q, k, v, grid, resolve_window(window, grid), shot_starts=shot_starts,
                context_frames=context_frames, softmax_scale=softmax_scale, backend=backend, valid=valid,
            )
        )
    if frame_attention:
        _, H, W = grid
        branches.append(
            window_attention(
                q, k, v, grid, (1, H, W), shot_starts=shot_starts, softmax_scale=softmax_scale, backend=backend,
                valid=valid,
            )
        )
    # Average in at least float32 so that half-precision branch outputs are rounded once.
    acc_dtype = torch.promote_types(q.dtype, torch.float32)
    return (sum(b.to(acc_dtype) for b in branches) / len(branches)).to(q.dtype)


class MoGAAttention(nn.Module):
    """Self-attention layer with MoGA: q/k/v projections, router, branches, mean, output projection.

    Args:
        dim: model width; ``dim % num_heads == 0``, head dim ``dim // num_heads``.
        num_heads: query heads. num_kv_heads: key/value heads (GQA), defaults to num_heads.
        num_groups: M, groups of the routed branch (M = 1: dense attention).
        window: STGA window, fixed (wt, wh, ww) or :class:`WindowSplit`; None: no STGA branch.
        frame_attention: add the per-frame branch.
        top_k: groups per token. context_frames: cross-shot context frames of STGA.
        qk_norm: RMSNorm (eps 1e-6, learned scale) over the full q and k projections, as Wan 2.1.
        bias: bias of the q/k/v/output projections. router_bias: bias of the router.
        router: "learned" (the paper's :class:`MoGARouter` on x) or "kmeans": training-free groups, the k-means
            clusters of the layer's keys (heads concatenated, after qk-norm and rotary embedding) with a gate of 1,
            re-used across calls (:class:`moga.kmeans.KMeansRouter`; call ``layer.router.cache.reset()`` for a
            new video). Needs top_k = 1 and no sequence parallelism.
        backend: segment-attention backend for every branch.
        sequence_parallel_group: run with Ulysses sequence parallelism over this group: x is then this rank's
            contiguous shard (B, N/P, dim) while ``grid`` and ``shot_starts`` describe the whole sequence.

    ``forward(x, *, grid=None, shot_starts=None, rotary_emb=None)``: x (B, N, dim) -> (B, N, dim); a
    self-attention layer, so a call with key/value tensors (``layer(x, mem, mem)``) is a TypeError. After each
    call ``last_balance_loss`` holds the group balance loss (paper form, without alpha) of its routing (with
    sequence parallelism: of this rank's tokens).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_groups: int,
        *,
        window: WindowArg = None,
        frame_attention: bool = False,
        top_k: int = 1,
        num_kv_heads: int | None = None,
        qk_norm: bool = False,
        bias: bool = True,
        router_bias: bool = False,
        context_frames: int = 0,
        backend: str = "auto",
        sequence_parallel_group: object | None = None,
        router: str = "learned",
    ) -> None:
        super().__init__()
        if router not in ROUTER_KINDS:
            raise ValueError(f"router must be {' or '.join(map(repr, ROUTER_KINDS))}, got {router!r}")
        if router == "kmeans" and (top_k != 1 or sequence_parallel_group is not None):
            raise ValueError("router='kmeans' needs top_k=1 and no sequence_parallel_group (it clusters local keys)")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        window = check_layer_settings(num_groups, top_k, window, context_frames)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        self.num_groups, self.top_k = num_groups, top_k
        self.window, self.frame_attention, self.context_frames = window, frame_attention, context_frames
        self.backend, self.sequence_parallel_group = backend, sequence_parallel_group
        kv_dim = num_kv_heads * self.head_dim
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, kv_dim, bias=bias)
        self.to_v = nn.Linear(dim, kv_dim, bias=bias)
        self.to_out = nn.Linear(dim, dim, bias=bias)
        self.norm_q = nn.RMSNorm(dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(kv_dim, eps=QK_NORM_EPS) if qk_norm else nn.Identity()
        self.router_kind = router
        self.router = KMeansRouter(num_groups) if router == "kmeans" else MoGARouter(dim, num_groups, bias=router_bias)
        self.last_balance_loss: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        *,
        grid: Sequence[int] | None = None,
        shot_starts: Sequence[int] | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, dim) -> (B, N, dim): self-attention over x only (there is no key/value input, unlike
        ``nn.MultiheadAttention``), so everything after x is keyword-only.

        grid: (T, H, W) with T * H * W == N (the whole sequence's N with sequence parallelism); required by
        the static branches and checked whenever given. shot_starts: latent frames where shots begin (see
        :func:`moga.window_attention`); needs grid. rotary_emb: (cos, sin) broadcastable to
        (B, N, heads, head_dim), applied as :func:`apply_rotary_interleaved`. valid: (B, N) bool or None,
        False marks padding: neither a query nor a key of any branch; its attention output is 0 (the layer's
        output there is ``to_out``'s bias) and the balance loss counts valid tokens only (one host
        synchronisation on a GPU). Not with sequence parallelism or ``router="kmeans"``.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seqlen, {self.dim}), got {tuple(x.shape)}")
        B, N, _ = x.shape
        if valid is not None and self.router_kind == "kmeans":
            raise NotImplementedError("valid (padding) is not supported with router='kmeans' (it clusters all keys)")
        q = self.norm_q(self.to_q(x)).view(B, N, self.num_heads, self.head_dim)
        k = self.norm_k(self.to_k(x)).view(B, N, self.num_kv_heads, self.head_dim)
        v = self.to_v(x).view(B, N, self.num_kv_heads, self.head_dim)
        if rotary_emb is not None:
            q = apply_rotary_interleaved(q, *rotary_emb)
            k = apply_rotary_interleaved(k, *rotary_emb)
        logits = self.router(k.reshape(B, N, -1) if self.router_kind == "kmeans" else x)
        out = moga_layer_attention(
            q, k, v, logits, top_k=self.top_k, grid=grid, window=self.window, frame_attention=self.frame_attention,
            shot_starts=shot_starts, context_frames=self.context_frames, backend=self.backend,
            sequence_parallel_group=self.sequence_parallel_group, valid=valid,
        )
        self.last_balance_loss = group_balance_loss(
            logits if valid is None else logits[valid], self.top_k, form="paper"
        )  # fmt: skip
        return self.to_out(out.reshape(B, N, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"num_groups={self.num_groups}, top_k={self.top_k}, window={self.window}, "
            f"frame_attention={self.frame_attention}, context_frames={self.context_frames}"
        )

