"""``moga plan``: what one video costs a video DiT with and without MoGA (tokens, forward FLOPs, attention memory).

For a model (a preset or any dims), a video (seconds, fps, resolution) and MoGA settings (M, group-size distribution,
STGA window, shots, context frames, per-frame branch), :func:`plan` returns the token count, the whole-model forward
FLOPs split into linear layers, full attention, the routed branch and the static branches, and the memory of the
attention inputs and outputs. With a ``moga bench --json`` file it also predicts the attention time from the
TFLOP/s measured there. ``moga plan --help`` lists the options; :func:`paper_check` compares with the paper.

How the figures are computed (every assumption where the paper is silent is marked *assumed*):

* Video to tokens. Frames (:func:`video_frames`, the one rule ``plan`` and ``moga plan`` share): ``--frames`` if
  given; else the preset's own frame count if the preset has one and the video asked for is the preset's video
  (seconds and fps, given or defaulted, equal the preset's: the MMDiT's 60 s at 24 fps is the paper's 1,441 frames
  = 60 x 24 + 1); else, from seconds x fps, the largest 4k+1 not above it (:func:`frames_for`, Wan's rule: 30 s at
  16 fps = 480 -> 477 frames, the paper's figure; the MMDiT at 30 s -> 717). Passing a preset's own seconds or fps
  explicitly therefore never changes the result. Latent frames T = (frames - 1) // 4 + 1 (VAE stride 4 in time,
  first frame alone), latent H x W = height / 8 x width / 8, patch 1 x 2 x 2: tokens per frame
  (height / 16) x (width / 16). 480p = 832 x 480 -> 30 x 52 = 1,560 per frame; 477 frames -> 120 x 1,560 = 187,200.
* FLOPs are forward FLOPs, 2 per multiply-add, batch 1, one denoising step (one model call; classifier-free
  guidance doubles it). Linear layers: 2 x tokens x weights, for q, k, v, o, the FFN (two matrices, hidden -> ffn ->
  hidden), the cross-attention q and o on video tokens and its k and v on the text tokens, the patch embedding and
  the output head; the text encoder, the time embedding, norms, modulation, rotary embeddings, softmax and
  elementwise work are not counted (each is < 0.1% here). Attention over q tokens and k keys: 4 x q x k x hidden
  (q kT and p v). Wan 2.1 is a cross-attention DiT with 512 text tokens (its ``text_len``).
* Routed branch: 4 x hidden x sum_g n_g^2 per layer, n_g from the group-size distribution (``balanced``: N/M each;
  ``zipf``: n_g ~ 1/g), as in ``moga bench``. Plus the router, 2 x N x hidden x M.
* Static branches: STGA tiles each shot's latent frames into windows of ``window_frames`` frames (restarting at
  every shot, the last one partial) and each frame into rows x cols spatial windows (ceil sizes, as
  :class:`moga.WindowSplit`); every window's queries attend to its own tokens plus, as keys only, ``context_frames``
  frames of the previous and of the next shot at the same spatial window (as :func:`moga.window_attention`). The
  per-frame branch attends over each whole latent frame. Cost 4 x hidden x sum over windows of queries x keys.
* MoGA layer = routed + STGA + per-frame (+ the cross-attention, unchanged); every layer is a MoGA layer (*assumed*).
  Mean of the branches and the gate are elementwise (not counted).
* Memory (per layer, activations only): q, k, v and the output in the compute dtype, the softmax statistics (fp32,
  one per token and head) of each branch a backward pass keeps, the branch outputs before their mean, the routing
  metadata (int64 ids and permutation, fp32 gate, fp32 router logits); and, for comparison, what materialising
  full attention's N x N score matrix would take (flash-style kernels never do).

The paper's table (Wan 2.1 1.3B, 30 s at 16 fps, 480p): full attention 6.94 PFLOPs; MoGA M = 5, 10, 20: 2.26, 1.56,
1.22. The full figure is reproduced: 6.459 (self-attention) + 0.468 (linear) + 0.018 (cross-attention) = 6.945
PFLOPs. The paper does not say how its MoGA rows were counted. They are matched to within 0.005 PFLOPs by
``full / M + 0.87``: the whole full-model figure divided by M, plus a constant 0.87 PFLOPs (see
:func:`paper_check`). Counted as above (linear layers do not shrink with M; balanced groups; 40-frame STGA windows
2 x 2, one shot, per-frame branch: the library's ``paper_config("wan")``), MoGA costs 2.37 / 1.72 / 1.40 PFLOPs:
0.468 linear + 0.018 cross-attention + 6.459 / M routed + 0.538 STGA + 0.054 per-frame (self-attention sparsity
70.8% at M = 5; the paper says 71.25%). The paper's constant 0.87 equals our static branches
with 60-frame STGA windows (0.807 + 0.054 = 0.861), or our linear layers plus 0.38 PFLOPs of static branches; which
reading the paper used cannot be told from the three rows, and ``plan`` does not guess: it counts as above.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, replace

VAE_STRIDE = (4, 8, 8)  # Wan VAE: time, height, width
PATCH = (1, 2, 2)
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
PAPER_FULL_PFLOPS = 6.94  # Wan 2.1 1.3B, 30 s, 16 fps, 480p
PAPER_MOGA_PFLOPS = {5: 2.26, 10: 1.56, 20: 1.22}


@dataclass(frozen=True)
class ModelConfig:
    """A video DiT's dims. ``text_mode``: ``"cross"`` (text in cross-attention, Wan) or ``"none"``.

    ``preset``: the key in :data:`PRESETS` whose video and MoGA defaults :func:`plan` uses for this model (kept by
    ``dataclasses.replace``, so a preset with changed dims keeps them); None: 5 s at 16 fps and ``MoGASettings()``.
    """

    name: str
    layers: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    text_tokens: int = 512
    text_mode: str = "cross"
    latent_channels: int = 16
    preset: str | None = None

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "head_dim", "ffn", "latent_channels"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.heads * self.head_dim != self.hidden:
            raise ValueError(f"heads x head_dim must equal hidden: {self.heads} x {self.head_dim} != {self.hidden}")
        if self.text_mode not in ("cross", "none") or self.text_tokens < 0:
            raise ValueError(f"text_mode must be 'cross' or 'none' and text_tokens >= 0, got {self}")


@dataclass(frozen=True)
class MoGASettings:
    """MoGA's branches: M groups with a size distribution, STGA windows (``window_frames`` latent frames deep,
    ``rows`` x ``cols`` per frame, None: no STGA), per-frame attention, shots (start latent frames) and context."""

    num_groups: int = 5
    distribution: str = "balanced"
    window_frames: int | None = 40
    rows: int = 2
    cols: int = 2
    frame_attention: bool = True
    shot_starts: tuple[int, ...] = (0,)
    context_frames: int = 2


# Wan 2.1's published configs (hidden, FFN, heads, layers; 512 text tokens). The MMDiT is the paper's own model,
# whose dims are not published: the preset ASSUMES Wan 14B's dims and gives only the paper's MoGA settings.
PRESETS = {
    "wan2.1-1.3b": ModelConfig("Wan 2.1 1.3B", 30, 1536, 12, 128, 8960, preset="wan2.1-1.3b"),
    "wan2.1-14b": ModelConfig("Wan 2.1 14B", 40, 5120, 40, 128, 13824, preset="wan2.1-14b"),
    "mmdit": ModelConfig("paper's MMDiT (dims assumed = Wan 2.1 14B)", 40, 5120, 40, 128, 13824, preset="mmdit"),
}
PRESET_MOGA = {
    "wan2.1-1.3b": MoGASettings(num_groups=5, window_frames=40, rows=2, cols=2),
    "wan2.1-14b": MoGASettings(num_groups=5, window_frames=40, rows=2, cols=2),
    "mmdit": MoGASettings(num_groups=20, window_frames=60, rows=4, cols=4),
}
PRESET_VIDEO = {  # (seconds, fps, frames of exactly that video or None: frames_for(seconds, fps)); see video_frames
    "wan2.1-1.3b": (30.0, 16.0, None),
    "wan2.1-14b": (30.0, 16.0, None),
    "mmdit": (60.0, 24.0, 1441),  # the paper's 1,441 frames = 60 x 24 + 1 (frames_for(60, 24) would give 1,437)
}
DEFAULT_VIDEO = (5.0, 16.0, None)  # a model that is no preset


@dataclass
class Plan:
    """Everything :func:`plan` computed. FLOPs are per forward pass (batch 1), bytes per layer unless named."""

    model: ModelConfig
    moga: MoGASettings
    frames: int
    resolution: tuple[int, int]  # (width, height) in pixels
    grid: tuple[int, int, int]  # latent (T, H, W) after patchify
    tokens: int
    dtype: str
    flops: dict[str, float] = field(default_factory=dict)
    memory_bytes: dict[str, float] = field(default_factory=dict)
    group_sizes: list[int] = field(default_factory=list)
    predicted_s: dict[str, float] = field(default_factory=dict)
    prediction_note: str = ""

    @property
    def full_total(self) -> float:
        f = self.flops
        return f["linear"] + f["full_attention"] + f["cross_attention"]

    @property
    def moga_total(self) -> float:
        f = self.flops
        return f["linear"] + f["router"] + f["routed"] + f["stga"] + f["frame"] + f["cross_attention"]

    @property
    def attention_sparsity(self) -> float:
        """1 - (query-key pairs MoGA computes) / (full attention's pairs), self-attention only."""
        f = self.flops
        return 1.0 - (f["routed"] + f["stga"] + f["frame"]) / f["full_attention"]

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(full_total=self.full_total, moga_total=self.moga_total, attention_sparsity=self.attention_sparsity)
        return d


def _check_positive(name: str, value: float) -> None:
    try:
        ok = math.isfinite(value) and value > 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def frames_for(seconds: float, fps: float) -> int:
    """The largest 4k+1 frame count not above seconds x fps (Wan's VAE takes 4k+1 frames)."""
    _check_positive("seconds", seconds)
    _check_positive("fps", fps)
    raw = math.floor(seconds * fps + 1e-9)
    if raw < 1:
        raise ValueError(f"a video of {seconds} s at {fps} fps has no frame")
    return (raw - 1) // 4 * 4 + 1


def video_frames(
    preset: str | None, seconds: float | None = None, fps: float | None = None, frames: int | None = None
) -> int:
    """The frame count of the video :func:`plan` counts; the one place the rule lives (see the module docstring).

    ``frames`` if given (4k+1, checked by :func:`latent_grid`); else the preset's own frame count when the preset has
    one and ``seconds`` and ``fps`` (None: the preset's) both equal the preset's; else :func:`frames_for`. Defaults of
    a model that is no preset (``preset`` None): 5 s at 16 fps. ``seconds`` and ``fps``, when given, must be > 0
    even next to ``frames``.
    """
    if preset is not None and preset not in PRESET_VIDEO:
        raise ValueError(f"unknown preset {preset!r}; presets: {', '.join(PRESET_VIDEO)}")
    d_seconds, d_fps, d_frames = PRESET_VIDEO[preset] if preset is not None else DEFAULT_VIDEO
    seconds = d_seconds if seconds is None else seconds
    fps = d_fps if fps is None else fps
    _check_positive("seconds", seconds)
    _check_positive("fps", fps)
    if frames is not None:
        return frames
    if d_frames is not None and (seconds, fps) == (d_seconds, d_fps):
        return d_frames
    return frames_for(seconds, fps)


def _model_config(model: str | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model not in PRESETS:
        raise ValueError(f"unknown model {model!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[model]


def moga_defaults(model: str | ModelConfig) -> MoGASettings:
    """The MoGA settings :func:`plan` uses when given none: the preset's paper settings, else ``MoGASettings()``."""
    return PRESET_MOGA.get(_model_config(model).preset, MoGASettings())


def latent_grid(frames: int, width: int, height: int) -> tuple[int, int, int]:
    """(T, H, W) of the token grid: VAE stride (4, 8, 8) then patch (1, 2, 2)."""
    if frames < 1 or (frames - 1) % VAE_STRIDE[0]:
        raise ValueError(f"frames must be 4k+1 (Wan VAE), got {frames}")
    sh, sw = VAE_STRIDE[1] * PATCH[1], VAE_STRIDE[2] * PATCH[2]
    if width % sw or height % sh:
        raise ValueError(f"width and height must be multiples of {sw} and {sh}, got {width} x {height}")
    return (frames - 1) // VAE_STRIDE[0] + 1, height // sh, width // sw


def _shot_bounds(shot_starts: tuple[int, ...], num_frames: int) -> list[tuple[int, int]]:
    starts = sorted(set((0, *shot_starts)))
    if starts[-1] >= num_frames or starts[0] < 0:
        raise ValueError(f"shot starts must lie in [0, {num_frames}), got {shot_starts}")
    ends = [*starts[1:], num_frames]
    return list(zip(starts, ends, strict=True))


def stga_pairs(grid: tuple[int, int, int], s: MoGASettings) -> int:
    """Query-key pairs of the STGA branch (see the module docstring for the tiling)."""
    if s.window_frames is None:
        return 0
    T, H, W = grid
    wh, ww = -(-H // s.rows), -(-W // s.cols)
    spatial = [min(wh, H - r) * min(ww, W - c) for r in range(0, H, wh) for c in range(0, W, ww)]
    per_frame_sq = sum(a * a for a in spatial)  # sum over spatial windows of (tokens per frame)^2
    shots = _shot_bounds(s.shot_starts, T)
    pairs = 0
    for j, (start, end) in enumerate(shots):
        ctx = 0
        if s.context_frames and j > 0:
            ctx += min(s.context_frames, shots[j - 1][1] - shots[j - 1][0])
        if s.context_frames and j + 1 < len(shots):
            ctx += min(s.context_frames, shots[j + 1][1] - shots[j + 1][0])
        for t0 in range(start, end, s.window_frames):
            wt = min(s.window_frames, end - t0)
            # per spatial window a: queries wt*a, keys (wt + ctx)*a
            pairs += wt * (wt + ctx) * per_frame_sq
    return pairs


def plan(
    model: str | ModelConfig = "wan2.1-1.3b",
    *,
    seconds: float | None = None,
    fps: float | None = None,
    frames: int | None = None,
    width: int = 832,
    height: int = 480,
    moga: MoGASettings | None = None,
    dtype: str = "bfloat16",
    bench_json: str | None = None,
    bench_method: str = "moga_attention[auto]",
) -> Plan:
    """Tokens, forward FLOPs and attention memory of one video through ``model`` (a preset name or dims).

    Args:
        model: ``"wan2.1-1.3b"``, ``"wan2.1-14b"``, ``"mmdit"`` or a :class:`ModelConfig` (its ``preset`` field
            picks the video and MoGA defaults, so ``replace(PRESETS["mmdit"], layers=20)`` keeps the MMDiT's).
        seconds, fps, frames: the video (None: the preset's; a model that is no preset: 5 s at 16 fps). Frames, by
            :func:`video_frames`: ``frames`` (4k+1) if given; else the preset's own count if seconds and fps equal
            the preset's (MMDiT: 60 s at 24 fps = the paper's 1,441 frames); else :func:`frames_for` (the largest
            4k+1 not above seconds x fps; Wan 30 s at 16 fps: 477).
        width, height: pixels (default 480p = 832 x 480; multiples of 16).
        moga: MoGA settings (default: the preset's paper settings, else :class:`MoGASettings`()).
        dtype: of q, k, v and outputs, for the memory figures.
        bench_json: a ``moga bench --json`` file: predict attention time from its measured TFLOP/s.
        bench_method: the bench method whose rate times the MoGA branches (dense SDPA times full attention).
    Returns:
        a :class:`Plan`; ``flops`` keys: linear, router, full_attention, cross_attention, routed, stga, frame.
    """
    cfg = _model_config(model)
    frames = video_frames(cfg.preset, seconds, fps, frames)
    moga = moga if moga is not None else moga_defaults(cfg)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    if moga.num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {moga.num_groups}")
    grid = latent_grid(frames, width, height)
    T, H, W = grid
    n = T * H * W
    d, L, nt = cfg.hidden, cfg.layers, cfg.text_tokens if cfg.text_mode == "cross" else 0
    patch_in = cfg.latent_channels * PATCH[0] * PATCH[1] * PATCH[2]

    per_token_weights = 4 * d * d + 2 * d * cfg.ffn + (2 * d * d if nt else 0)
    linear = L * (2 * n * per_token_weights + 2 * nt * 2 * d * d) + 2 * n * patch_in * d * 2
    from moga.bench.cases import group_sizes  # here: importing moga does not import the bench

    sizes = group_sizes(n, moga.num_groups, moga.distribution)
    flops = {
        "linear": float(linear),
        "router": float(L * 2 * n * d * moga.num_groups),
        "full_attention": float(L * 4 * n * n * d),
        "cross_attention": float(L * 4 * n * nt * d),
        "routed": float(L * 4 * d * sum(g * g for g in sizes)),
        "stga": float(L * 4 * d * stga_pairs(grid, moga)),
        "frame": float(L * 4 * d * T * (H * W) ** 2) if moga.frame_attention else 0.0,
    }
    b = DTYPE_BYTES[dtype]
    branches = 1 + (moga.window_frames is not None) + moga.frame_attention
    memory = {
        "q_k_v_out": 4.0 * n * d * b,
        "branch_outputs": float(branches * n * d * b),
        "softmax_stats_fp32": float(branches * n * cfg.heads * 4),
        "routing_metadata": float(n * (8 + 8 + 4) + n * moga.num_groups * 4),
        "full_scores_if_materialised": float(n) * n * cfg.heads * b,
    }
    result = Plan(cfg, moga, frames, (width, height), grid, n, dtype, flops, memory, sizes)
    if bench_json:
        _predict(result, bench_json, bench_method)
    return result


def _bench_rate(rows: list[dict], method: str, mode: str) -> dict | None:
    """The ok row of ``method`` in ``mode`` with the largest N (rates grow with N until they saturate)."""
    cands = [r for r in rows if r.get("method") == method and r.get("mode") == mode and r.get("status") == "ok"]
    return max(cands, key=lambda r: (r["n"], r.get("tflops") or 0.0)) if cands else None


def _predict(p: Plan, path: str, method: str) -> None:
    with open(path) as f:
        doc = json.load(f)
    rows, env = doc.get("results", []), doc.get("environment", {})
    dense, moga_row = _bench_rate(rows, "dense_sdpa", "fwd"), _bench_rate(rows, method, "fwd")
    if dense is None or moga_row is None:
        missing = "dense_sdpa" if dense is None else method
        raise ValueError(f"{path}: no successful fwd row of {missing!r}")
    f = p.flops
    p.predicted_s = {
        "full_attention": (f["full_attention"] + f["cross_attention"]) / (dense["tflops"] * 1e12),
        "moga_attention": (f["routed"] + f["stga"] + f["frame"]) / (moga_row["tflops"] * 1e12)
        + f["cross_attention"] / (dense["tflops"] * 1e12),
    }
    dims = {(r["heads"], r["head_dim"], r["dtype"]) for r in (dense, moga_row)}
    p.prediction_note = (
        f"rates from {path} ({env.get('device', '?')}): dense_sdpa {dense['tflops']:.3g} TFLOP/s at N={dense['n']}, "
        f"{method} {moga_row['tflops']:.3g} TFLOP/s at N={moga_row['n']} (fwd; measured at H, D, dtype = {sorted(dims)}"
        f"; the model has H={p.model.heads}, D={p.model.head_dim}, {p.dtype}: a rate measured at another N, H, D "
        "or dtype is only an estimate)"
    )


def _pf(x: float) -> str:
    return f"{x / 1e15:9.3f}"


def _bytes(x: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if x >= scale:
            return f"{x / scale:8.2f} {unit}"
    return f"{x / 1e3:8.2f} kB"


def format_plan(p: Plan) -> str:
    """The human-readable report of ``moga plan``."""
    m, s, f = p.model, p.moga, p.flops
    T, H, W = p.grid
    per_frame = H * W
    window = "off" if s.window_frames is None else f"{s.window_frames} frames x {s.rows}x{s.cols} per frame"
    sizes = p.group_sizes
    lines = [
        f"model: {m.name}: {m.layers} layers, hidden {m.hidden} = {m.heads} heads x {m.head_dim}, FFN {m.ffn}, "
        f"text {m.text_mode} ({m.text_tokens if m.text_mode == 'cross' else 0} tokens)",
        f"video: {p.frames} frames of {p.resolution[0]}x{p.resolution[1]} -> token grid (T, H, W) = ({T}, {H}, {W}): "
        f"{per_frame:,} tokens per frame, N = {p.tokens:,} tokens",
        f"MoGA: M = {s.num_groups} ({s.distribution}: largest group {max(sizes):,}, smallest {min(sizes):,}), "
        f"STGA {window}, shots at {list(s.shot_starts)}, context {s.context_frames} frames, "
        f"per-frame {'on' if s.frame_attention else 'off'}",
        "",
        "forward FLOPs (PFLOPs, batch 1, one model call)      full attention      MoGA",
        f"  linear layers (qkvo, FFN, cross q/o/k/v, embed)   {_pf(f['linear'])}        {_pf(f['linear'])}",
        f"  router (N x hidden x M)                           {_pf(0)}        {_pf(f['router'])}",
        f"  self-attention: full                              {_pf(f['full_attention'])}        {_pf(0)}",
        f"  self-attention: routed branch                     {_pf(0)}        {_pf(f['routed'])}",
        f"  self-attention: STGA branch                       {_pf(0)}        {_pf(f['stga'])}",
        f"  self-attention: per-frame branch                  {_pf(0)}        {_pf(f['frame'])}",
        f"  cross-attention (text)                            {_pf(f['cross_attention'])}        "
        f"{_pf(f['cross_attention'])}",
        f"  total                                             {_pf(p.full_total)}        {_pf(p.moga_total)}",
        f"  MoGA / full: {p.moga_total / p.full_total:.3f} of the FLOPs; self-attention sparsity "
        f"{100 * p.attention_sparsity:.2f}%",
        "",
        f"attention memory per layer ({p.dtype} q/k/v/out, batch 1):",
    ]
    names = {
        "q_k_v_out": "q, k, v and output",
        "branch_outputs": "MoGA branch outputs before the mean",
        "softmax_stats_fp32": "softmax statistics kept for backward (fp32)",
        "routing_metadata": "routing: ids, permutation, gate, router logits",
        "full_scores_if_materialised": "full N x N scores if materialised (flash never does)",
    }
    for k, label in names.items():
        lines.append(f"  {label:<55}{_bytes(p.memory_bytes[k])}")
    lines.append(f"  q, k, v and output over all {m.layers} layers: {_bytes(p.memory_bytes['q_k_v_out'] * m.layers)}")
    if p.predicted_s:
        lines += [
            "",
            f"predicted attention time per forward: full {p.predicted_s['full_attention']:.3f} s, "
            f"MoGA {p.predicted_s['moga_attention']:.3f} s",
            f"  {p.prediction_note}",
        ]
    return "\n".join(lines)


@dataclass
class PaperCheck:
    full_pflops: float  # ours, Wan 2.1 1.3B, 30 s, 16 fps, 480p
    moga_pflops: dict[int, float]  # ours, counted as in the module docstring
    fit_constant: float  # c in  paper_row(M) ~ paper_full / M + c  (least squares over the three rows)
    fit_residuals: dict[int, float]


def paper_check() -> PaperCheck:
    """Our figures for the paper's table and the fit that explains its MoGA rows (see the module docstring)."""
    full = plan("wan2.1-1.3b").full_total / 1e15
    ours = {m: plan("wan2.1-1.3b", moga=replace(PRESET_MOGA["wan2.1-1.3b"], num_groups=m)).moga_total / 1e15
            for m in PAPER_MOGA_PFLOPS}  # fmt: skip
    c = sum(v - PAPER_FULL_PFLOPS / m for m, v in PAPER_MOGA_PFLOPS.items()) / len(PAPER_MOGA_PFLOPS)
    residuals = {m: v - (PAPER_FULL_PFLOPS / m + c) for m, v in PAPER_MOGA_PFLOPS.items()}
    return PaperCheck(full, ours, c, residuals)


def format_paper_check(pc: PaperCheck) -> str:
    lines = [
        "paper (Wan 2.1 1.3B, 30 s, 16 fps, 480p), PFLOPs:",
        f"  full attention: paper {PAPER_FULL_PFLOPS:.2f}, ours {pc.full_pflops:.3f} "
        f"({100 * (pc.full_pflops / PAPER_FULL_PFLOPS - 1):+.2f}%)",
    ]
    for m, v in PAPER_MOGA_PFLOPS.items():
        lines.append(
            f"  MoGA M={m:<2}: paper {v:.2f}, full/M + {pc.fit_constant:.3f} = "
            f"{PAPER_FULL_PFLOPS / m + pc.fit_constant:.3f} (residual {pc.fit_residuals[m]:+.3f}); "
            f"ours (linear layers not divided by M) {pc.moga_pflops[m]:.3f}"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="wan2.1-1.3b", help=f"a preset ({', '.join(PRESETS)}) or 'custom' with the dims")
    for name, help_ in (
        ("--layers", "transformer blocks"),
        ("--hidden", "model width (= heads x head-dim)"),
        ("--heads", "attention heads"),
        ("--head-dim", "head dim"),
        ("--ffn", "FFN inner width"),
        ("--text-tokens", "cross-attention text tokens (0: none)"),
    ):
        p.add_argument(name, type=int, help=f"{help_} (overrides the preset)")
    p.add_argument("--seconds", type=float, help="video length (default: the preset's; custom: 5)")
    p.add_argument("--fps", type=float, help="frames per second (default: the preset's; custom: 16)")
    p.add_argument(
        "--frames",
        type=int,
        help="exact frame count (4k+1). Without it: the preset's own count when seconds and fps are the preset's "
        "(mmdit: 60 s at 24 fps = the paper's 1441), else the largest 4k+1 not above seconds x fps",
    )
    p.add_argument("--resolution", default="832x480", metavar="WxH", help="pixels (default 480p: 832x480)")
    p.add_argument("--m", type=int, help="routed groups M (default: the preset's)")
    p.add_argument("--dist", choices=("balanced", "zipf"), help="group-size distribution (default balanced)")
    p.add_argument("--window-frames", type=int, help="STGA window depth in latent frames; 0: no STGA")
    p.add_argument("--split", metavar="RxC", help="STGA spatial windows per frame, e.g. 2x2")
    p.add_argument("--no-frame-attention", action="store_true", help="drop the per-frame branch")
    p.add_argument("--shots", type=int, nargs="+", metavar="FRAME", help="latent frames where shots start")
    p.add_argument("--context-frames", type=int, help="STGA context frames per adjacent shot (default 2)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bfloat16", help="for the memory figures")
    p.add_argument("--bench-json", metavar="PATH", help="moga bench --json output: predict the attention time")
    p.add_argument("--bench-method", default="moga_attention[auto]", help="bench method that times MoGA's branches")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--paper", action="store_true", help="compare with the paper's PFLOPs table")


def _pair(text: str, name: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise SystemExit(f"moga plan: {name} must look like 832x480, got {text!r}") from exc
    return a, b


def run_cli(args: argparse.Namespace) -> int:
    """``moga plan``: print the plan (and the paper comparison with --paper); returns the exit code.

    A thin wrapper over :func:`plan`: it builds the model (a preset, a preset with changed dims that keeps the
    preset's defaults through ``ModelConfig.preset``, or custom dims) and the MoGA overrides; every default and the
    frame rule are :func:`plan`'s.
    """
    dims = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "head_dim", "ffn", "text_tokens")}
    given = {k: v for k, v in dims.items() if v is not None}
    key = args.model
    try:
        if key == "custom":
            if any(v is None for k, v in dims.items() if k != "text_tokens"):
                raise ValueError("--model custom needs --layers --hidden --heads --head-dim --ffn")
            model: str | ModelConfig = ModelConfig("custom", **given)
        elif key in PRESETS:
            model = replace(PRESETS[key], name=f"{PRESETS[key].name} (modified)", **given) if given else key
        else:
            raise ValueError(f"unknown model {key!r}; presets: {', '.join(PRESETS)} (or 'custom')")
        overrides: dict = {}
        if args.m is not None:
            overrides["num_groups"] = args.m
        if args.dist:
            overrides["distribution"] = args.dist
        if args.window_frames is not None:
            overrides["window_frames"] = args.window_frames or None
        if args.split:
            overrides["rows"], overrides["cols"] = _pair(args.split, "--split")
        if args.no_frame_attention:
            overrides["frame_attention"] = False
        if args.shots:
            overrides["shot_starts"] = tuple(args.shots)
        if args.context_frames is not None:
            overrides["context_frames"] = args.context_frames
        width, height = _pair(args.resolution, "--resolution")
        result = plan(
            model,
            seconds=args.seconds,
            fps=args.fps,
            frames=args.frames,
            width=width,
            height=height,
            moga=replace(moga_defaults(model), **overrides) if overrides else None,
            dtype=args.dtype,
            bench_json=args.bench_json,
            bench_method=args.bench_method,
        )
    except (ValueError, OSError) as exc:
        raise SystemExit(f"moga plan: {exc}") from exc
    print(format_plan(result))
    if args.paper:
        print()
        print(format_paper_check(paper_check()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.as_dict(), f, indent=1)
        print(f"wrote {args.json}")
    return 0
