"""Dense float64 references, written straight from the definitions (O(N^2) memory; for tests only).

They share no code with the fast paths: masks come from comparing group ids, top-k membership from
counting ranks, so a bug in the layout or routing code cannot hide in both.
"""

from __future__ import annotations

import math

import torch


def _expand_kv(k: torch.Tensor, Hq: int) -> torch.Tensor:
    return k.repeat_interleave(Hq // k.shape[2], dim=2)


def masked_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in float64.

    Args:
        q: (B, N, Hq, D); k, v: (B, Nk, Hkv, D).
        mask: (B, N, Nk) bool (shared by heads) or (B, Hq, N, Nk); True where query i may attend key j.
            A query with no allowed key gets output 0.
    Returns: (B, N, Hq, D) float64.
    """
    D = q.shape[-1]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    q64, k64, v64 = q.double(), _expand_kv(k.double(), q.shape[2]), _expand_kv(v.double(), q.shape[2])
    scores = torch.einsum("bihd,bjhd->bhij", q64, k64) * scale
    if mask.dim() == 3:
        mask = mask[:, None]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.einsum("bhij,bjhd->bihd", probs, v64)


def group_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_ids: torch.Tensor, softmax_scale: float | None = None
) -> torch.Tensor:
    """Attention restricted to tokens of equal group id; negative ids are padding. (B, N, Hq, D) float64."""
    g = group_ids.long()
    mask = (g[:, :, None] == g[:, None, :]) & (g[:, :, None] >= 0)
    return masked_attention_ref(q, k, v, mask, softmax_scale)


def topk_membership_ref(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """(..., M) -> (..., M) bool: group m is among the top_k most probable; ties go to the lower index.

    rank(m) = #{m': p[m'] > p[m]} + #{m' < m: p[m'] == p[m]}; member iff rank < top_k.
    """
    p = probs
    greater = (p[..., None, :] > p[..., :, None]).sum(-1)
    M = p.shape[-1]
    lower = torch.tril(torch.ones(M, M, dtype=torch.bool, device=p.device), diagonal=-1)  # [m, m'] = m' < m
    equal_lower = ((p[..., None, :] == p[..., :, None]) & lower).sum(-1)
    return (greater + equal_lower) < top_k


def moga_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    router_logits: torch.Tensor,
    top_k: int = 1,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """out[b, i] = sum over the top_k groups m of token i of p[b, i, m] * Attn_m(q_i). (B, N, Hq, D) float64.

    Differentiable in all inputs (use float64 leaves to get reference gradients).
    """
    probs = torch.softmax(router_logits.double(), dim=-1)
    member = topk_membership_ref(probs.detach(), top_k)  # (B, N, M)
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    for m in range(probs.shape[-1]):
        in_m = member[..., m]
        mask = in_m[:, :, None] & in_m[:, None, :]
        attn = masked_attention_ref(q, k, v, mask, softmax_scale)
        out = out + (probs[..., m] * in_m)[..., None, None] * attn
    return out


def cluster_pairs_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    top_p: float,
    min_clusters: int = 1,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """The key clusters each query cluster of :func:`moga.cluster_attention` attends to, from the definition.

    Args: q (B, N, Hq, D), k (B, N, Hkv, D), labels (B, N) (negative: no cluster).
    Returns: (B, Mq, Mk) bool with Mq, Mk = max label + 1; False rows for empty query clusters.

    Per batch row: centroids are plain means over a boolean mask; w_h[a, c] = n_c exp(s.qbar_a.kbar_c) normalised
    over non-empty c, w = mean over heads; rank(c) = #{non-empty c': w[c'] > w[c]} + #{non-empty c' < c:
    w[c'] == w[c]}; c is chosen iff non-empty and (top_p >= 1, or the w of the clusters of lower rank sums to less
    than top_p, or rank(c) < min_clusters).
    """
    D, Hq, Hkv = q.shape[-1], q.shape[2], k.shape[2]
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    Mq, Mk = int(q_labels.max()) + 1, int(k_labels.max()) + 1
    out = torch.zeros(q.shape[0], max(Mq, 0), max(Mk, 0), dtype=torch.bool)
    for b in range(q.shape[0]):
        for a in range(Mq):
            in_a = q_labels[b] == a
            if not in_a.any():
                continue
            qbar = q[b, in_a].double().mean(0)  # (Hq, D)
            w = torch.zeros(Mk, dtype=torch.float64)
            sizes = torch.tensor([int((k_labels[b] == c).sum()) for c in range(Mk)], dtype=torch.float64)
            for h in range(Hq):
                logits = torch.full((Mk,), -math.inf, dtype=torch.float64)
                for c in range(Mk):
                    if sizes[c] > 0:
                        kbar = k[b, k_labels[b] == c, h // (Hq // Hkv)].double().mean(0)
                        logits[c] = scale * float(qbar[h] @ kbar) + math.log(sizes[c])
                w += torch.softmax(logits, 0) / Hq
            for c in range(Mk):
                if sizes[c] == 0:
                    continue
                others = [c2 for c2 in range(Mk) if sizes[c2] > 0 and c2 != c]
                higher = [c2 for c2 in others if w[c2] > w[c] or (w[c2] == w[c] and c2 < c)]
                mass_before = float(sum(w[c2] for c2 in higher))
                out[b, a, c] = top_p >= 1 or mass_before < top_p or len(higher) < min_clusters
    return out


def cluster_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_labels: torch.Tensor,
    k_labels: torch.Tensor,
    top_p: float = 0.9,
    min_clusters: int = 1,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Dense float64 reference of :func:`moga.cluster_attention`: (B, N, Hq, D) float64, differentiable.

    Labels (B, N) shared by heads, or per head (B, N, Hq) / (B, N, Hkv): then each query head h chooses its pairs
    from its own head alone (q head h, kv head h // (Hq // Hkv)) and gets its own mask.
    """
    if q_labels.dim() == 3:
        group = q.shape[2] // k.shape[2]
        heads = []
        for h in range(q.shape[2]):
            qh, kh, vh = q[:, :, h : h + 1], k[:, :, h // group : h // group + 1], v[:, :, h // group : h // group + 1]
            heads.append(
                cluster_attention_ref(
                    qh, kh, vh, q_labels[..., h], k_labels[..., h // group], top_p, min_clusters, softmax_scale
                )
            )
        return torch.cat(heads, dim=2)
    ql, kl = q_labels.long().cpu(), k_labels.long().cpu()
    chosen = cluster_pairs_ref(q.detach().cpu(), k.detach().cpu(), ql, kl, top_p, min_clusters, softmax_scale)
    mask = torch.zeros(q.shape[0], q.shape[1], k.shape[1], dtype=torch.bool)
    for b in range(q.shape[0]):
        for i in range(q.shape[1]):
            if ql[b, i] >= 0:
                mask[b, i] = (kl[b] >= 0) & chosen[b, ql[b, i]][kl[b].clamp(min=0)]
    return masked_attention_ref(q, k, v, mask.to(q.device), softmax_scale)
