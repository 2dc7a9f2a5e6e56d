"""Static branches of MoGA: spatio-temporal window attention (STGA) and per-frame attention.

Tokens of a latent video lie in raster order over a grid (T, H, W): token i has frame t = i // (H * W),
row h = (i // W) % H, column w = i % W. A window (wt, wh, ww) tiles the grid from the origin into
non-overlapping boxes (edge boxes are partial); every query attends to all tokens of its box. Per-frame
attention is the window (1, H, W).

Shots (``shot_starts``) restart the temporal tiling: inside shot j, which holds frames [s_j, e_j), the
temporal windows are [s_j, s_j + wt), [s_j + wt, s_j + 2 wt), ... clipped at e_j, so no window spans two
shots. ``context_frames = c`` adds, to the keys and values only, the c frames of the previous shot nearest
the boundary (frames [max(s_{j-1}, s_j - c), s_j)) and the c frames of the next shot nearest the boundary
(frames [e_j, min(e_{j+1}, e_j + c))), at the same spatial window, to every window of shot j.
See docs/static_branches.md for the reasons behind these choices.

The branch runs on the segment-attention primitive: one segment per (batch row, window); queries are a
permutation of all tokens, keys add the context rows (so a token can be a key of several segments).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from moga._checks import check_qkv, softmax_scale_or_default
from moga.functional import _check_valid, _run_segments
from moga.layout import (
    RoutedLayout,
    SegmentLayout,
    inverse_permutation,
    resegment,
    segment_of_positions,
    sort_by_segment,
)
from moga.reference import masked_attention_ref

Grid = tuple[int, int, int]


def _positive_int_triple(value: object, name: str) -> Grid:
    if not isinstance(value, Sequence) or len(value) != 3:
        raise TypeError(f"{name} must be a sequence of three ints (T, H, W), got {value!r}")
    out = []
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int):
            raise TypeError(f"{name} entries must be ints, got {value!r}")
        if x < 1:
            raise ValueError(f"{name} entries must be >= 1, got {tuple(value)}")
        out.append(x)
    return out[0], out[1], out[2]


def check_grid(grid: object, num_tokens: int) -> Grid:
    """Validate a latent grid (T, H, W) whose product must equal the sequence length."""
    g = _positive_int_triple(grid, "grid")
    if math.prod(g) != num_tokens:
        raise ValueError(f"grid {g} holds {math.prod(g)} tokens but the sequence length is {num_tokens}")
    return g


def check_window(window: object) -> Grid:
    """Validate a window (wt, wh, ww) of positive ints (entries larger than the grid cover it whole)."""
    return _positive_int_triple(window, "window")


def normalize_shot_starts(shot_starts: Sequence[int] | torch.Tensor | None, num_frames: int) -> tuple[int, ...]:
    """Shot start frames as a tuple that always begins with 0.

    ``shot_starts`` lists the latent frames where shots begin, strictly increasing, each in [0, num_frames).
    It may start with 0 or not: frames before the first listed start form the first shot either way.
    None or an empty list means one shot.
    """
    if shot_starts is None:
        return (0,)
    if isinstance(shot_starts, torch.Tensor):
        if shot_starts.dim() != 1 or shot_starts.dtype.is_floating_point:
            raise TypeError(f"shot_starts must be a 1-D integer tensor or a list of ints, got {shot_starts!r}")
        shot_starts = shot_starts.tolist()  # host metadata the caller owns; layouts are cached on it
    starts = list(shot_starts)
    for s in starts:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"shot_starts must hold ints, got {shot_starts!r}")
    if any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"shot_starts must be strictly increasing, got {starts}")
    if starts and (starts[0] < 0 or starts[-1] >= num_frames):
        raise ValueError(f"shot_starts must lie in [0, {num_frames}) (the grid's frames), got {starts}")
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return tuple(starts)


def check_context_frames(context_frames: object) -> int:
    if isinstance(context_frames, bool) or not isinstance(context_frames, int):
        raise TypeError(f"context_frames must be an int, got {context_frames!r}")
    if context_frames < 0:
        raise ValueError(f"context_frames must be >= 0, got {context_frames}")
    return context_frames


@functools.lru_cache(maxsize=64)
def window_layout(
    grid: Grid,
    window: Grid,
    shot_starts: tuple[int, ...],
    context_frames: int,
    device: torch.device,
    batch: int,
) -> RoutedLayout:
    """The segment layout of window attention, built once per argument tuple (cached).

    Args: already validated (see :func:`window_attention`); ``shot_starts`` normalised to begin with 0.

    Returns: a :class:`RoutedLayout` with top_k = 1 whose segments are (batch row, window) pairs,
    S = batch * (temporal windows) * ceil(H / wh) * ceil(W / ww); ``position`` maps token rows to query
    positions. Within a segment, the window's own keys come first (raster order), then its context rows.
    """
    T, H, W = grid
    wt, wh, ww = window
    HW, N = H * W, T * H * W
    n_rows, n_cols = -(-H // wh), -(-W // ww)
    spatial_per_frame = n_rows * n_cols
    shot_ends = (*shot_starts[1:], T)

    # Temporal window of each frame: windows restart at every shot.
    frame_window = torch.empty(T, dtype=torch.int64)
    first_window = []  # first temporal window index of each shot
    n_windows = 0
    for s, e in zip(shot_starts, shot_ends, strict=True):
        first_window.append(n_windows)
        frame_window[s:e] = n_windows + torch.arange(e - s, dtype=torch.int64) // wt
        n_windows += -(-(e - s) // wt)
    segs_per_row = n_windows * spatial_per_frame

    # Spatial window of each position inside a frame, (HW,).
    hh = torch.arange(H, dtype=torch.int64).view(H, 1) // wh
    cc = torch.arange(W, dtype=torch.int64).view(1, W) // ww
    spatial = (hh * n_cols + cc).reshape(HW)

    own_seg = (frame_window.view(T, 1) * spatial_per_frame + spatial.view(1, HW)).reshape(N)
    seg_parts, tok_parts = [own_seg], [torch.arange(N, dtype=torch.int64)]
    for j, (s, e) in enumerate(zip(shot_starts, shot_ends, strict=True)):
        if context_frames == 0:
            break
        frames = []
        if j > 0:
            frames.append(torch.arange(max(shot_starts[j - 1], s - context_frames), s))
        if j + 1 < len(shot_starts):
            frames.append(torch.arange(e, min(shot_ends[j + 1], e + context_frames)))
        if not frames:
            continue
        ctx_frames = torch.cat(frames).to(torch.int64)
        ctx_tokens = (ctx_frames.view(-1, 1) * HW + torch.arange(HW).view(1, HW)).reshape(-1)  # (n_c,)
        ctx_spatial = spatial.repeat(ctx_frames.numel())  # (n_c,)
        shot_windows = torch.arange(first_window[j], first_window[j] + -(-(e - s) // wt), dtype=torch.int64)
        seg_parts.append((shot_windows.view(-1, 1) * spatial_per_frame + ctx_spatial.view(1, -1)).reshape(-1))
        tok_parts.append(ctx_tokens.repeat(shot_windows.numel()))
    k_seg_row, k_tok_row = torch.cat(seg_parts), torch.cat(tok_parts)

    rows = torch.arange(batch, dtype=torch.int64).view(batch, 1)
    q_keys = (own_seg.view(1, N) + rows * segs_per_row).reshape(-1)
    k_keys = (k_seg_row.view(1, -1) + rows * segs_per_row).reshape(-1)
    k_tokens = (k_tok_row.view(1, -1) + rows * N).reshape(-1)
    num_segments = batch * segs_per_row
    q_order, q_offsets = sort_by_segment(q_keys, num_segments)  # q position p reads token q_order[p]
    k_order, k_offsets = sort_by_segment(k_keys, num_segments)  # stable: own keys stay before context keys
    k_index = k_tokens[k_order]
    segments = SegmentLayout(
        q_index=q_order.to(device),
        q_offsets=q_offsets.to(device),
        k_index=k_index.to(device),
        k_offsets=k_offsets.to(device),
        num_tokens=batch * N,
        q_unique=True,
        k_unique=len(seg_parts) == 1,
        # Host-known bounds of the longest segment (a full window; its keys add c context frames on each side).
        max_q_len=min(wt, T) * min(wh, H) * min(ww, W),
        max_k_len=(min(wt, T) + 2 * context_frames) * min(wh, H) * min(ww, W),
    )
    return RoutedLayout(segments=segments, position=inverse_permutation(q_order).to(device), top_k=1)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int],
    *,
    shot_starts: Sequence[int] | torch.Tensor | None = None,
    context_frames: int = 0,
    softmax_scale: float | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Spatio-temporal window attention over a latent video grid (the static branches of MoGA).

    Args:
        q: (B, N, Hq, D); k, v: (B, N, Hkv, D); tokens in raster order over ``grid``.
        grid: (T, H, W) latent frames, rows, columns; T * H * W == N.
        window: (wt, wh, ww) window size in frames, rows, columns; (1, H, W) is per-frame attention.
        shot_starts: latent frames where shots begin (strictly increasing, in [0, T); 0 may be omitted).
            Temporal windows restart at every shot. Shared by all batch rows. Host values: a list, or a CPU
            tensor (a CUDA tensor works but is read back to the host, one synchronisation per call).
        context_frames: c >= 0; every window of a shot also attends (as keys/values only) to the c frames of
            the previous shot and the c frames of the next shot nearest the shot boundaries, same spatial
            window.
        softmax_scale: defaults to D ** -0.5.
        backend, deterministic: see :func:`moga.group_attention` (context rows are keys of several windows,
            so their gradients accumulate: ``deterministic`` makes that accumulation reproducible).
        valid: (B, N) bool or None; False marks padding: neither a query nor a key of any window, output 0 (as
            in :func:`moga.moga_attention`). The cached layout is then filtered on the device (one sort per call).

    Returns: (B, N, Hq, D), dtype of q. Differentiable in q, k and v. The layout depends only on the
    arguments' host values and is cached, so repeated calls never synchronise with the GPU.
    """
    B, N, _, _, D = check_qkv(q, k, v)
    g = check_grid(grid, N)
    win = check_window(window)
    shots = normalize_shot_starts(shot_starts, g[0])
    c = check_context_frames(context_frames)
    scale = softmax_scale_or_default(softmax_scale, D)
    # Under torch.compile the layout is traced from its (static) arguments into the graph: Dynamo does not
    # consult an lru_cache, so call the function itself rather than have it warn that it bypasses the cache.
    build = window_layout.__wrapped__ if torch.compiler.is_compiling() else window_layout
    layout = build(g, win, shots, c, q.device, B)
    if valid is not None:
        _check_valid(valid, B, N, q.device)
        layout = drop_padding(layout, valid.reshape(-1))
    return _run_segments(q, k, v, layout, scale, backend, deterministic)[:, 0].view(q.shape)


def drop_padding(layout: RoutedLayout, valid_rows: torch.Tensor) -> RoutedLayout:
    """``layout`` without the padded token rows (``valid_rows`` (T,) bool, False = padding): they become neither
    queries nor keys of any segment, and their query entries sit past the last segment (output 0, no gradient).
    Segments and ``position`` keep their meaning; no host synchronisation."""
    seg = layout.segments
    q_seg = segment_of_positions(seg.q_offsets, seg.q_index.numel())
    k_seg = segment_of_positions(seg.k_offsets, seg.k_index.numel())
    q_keys = torch.where(valid_rows[seg.q_index], q_seg, torch.full_like(q_seg, -1))
    k_keys = torch.where(valid_rows[seg.k_index], k_seg, torch.full_like(k_seg, -1))
    return resegment(layout, q_keys, k_keys, seg.num_segments)


def window_mask_ref(
    grid: Sequence[int],
    window: Sequence[int],
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
) -> torch.Tensor:
    """(N, N) bool, True where query i may attend key j; written from coordinates, sharing nothing with
    :func:`window_layout` (for tests)."""
    T, H, W = grid
    wt, wh, ww = window
    t, h, w = (x.reshape(-1) for x in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij"))
    starts = torch.tensor([s for s in (shot_starts or []) if s > 0], dtype=torch.int64)
    shot = (t[:, None] >= starts[None, :]).sum(1)  # shot id of each token
    all_starts = torch.cat([torch.zeros(1, dtype=torch.int64), starts])
    shot_start = all_starts[shot]
    twin = (t - shot_start) // wt
    same_spatial = ((h[:, None] // wh) == (h[None, :] // wh)) & ((w[:, None] // ww) == (w[None, :] // ww))
    same_box = same_spatial & (shot[:, None] == shot[None, :]) & (twin[:, None] == twin[None, :])
    c = context_frames
    from_prev = (shot[None, :] == shot[:, None] - 1) & (t[None, :] >= shot_start[:, None] - c)
    from_next = (shot[None, :] == shot[:, None] + 1) & (t[None, :] < shot_start[None, :] + c)
    return same_box | (same_spatial & (from_prev | from_next) & (c > 0))


def window_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: Sequence[int],
    window: Sequence[int],
    shot_starts: Sequence[int] | None = None,
    context_frames: int = 0,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Dense float64 reference of :func:`window_attention`: (B, N, Hq, D) float64 (differentiable)."""
    mask = window_mask_ref(grid, window, shot_starts, context_frames)
    return masked_attention_ref(q, k, v, mask.to(q.device).expand(q.shape[0], -1, -1), softmax_scale)
