"""Dense float64 references, written straight from the definitions (O(N^2) memory; for tests only).

They share no code with the fast paths: masks come from comparing group ids, top-k membership from
counting ranks, so a bug in the layout or routing code cannot hide in both.
"""

from __future__ import annotations

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
