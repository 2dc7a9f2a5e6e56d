"""The shared joint text-video core (moga.integrations._core.joint_moga_attention) against a dense float64
reference written from the semantics: video queries attend to their group / window AND to the row's valid text
keys; text queries attend to every valid token; padded text is never a key and, with pad_queries="zero", outputs 0.
"""

from __future__ import annotations

import pytest
import torch

from moga.integrations._core import joint_moga_attention
from moga.reference import masked_attention_ref, topk_membership_ref
from moga.window import window_mask_ref
from tests._gpu_backends import gpu_backends
from tests.utils import assert_weighted_grads_match, rel_err

B, H, D, M, K = 2, 2, 32, 3, 2
GRID, NT = (3, 2, 4), 5
NV = 24
VALID = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def joint_ref(q, k, v, logits, valid, video_first, pad_queries, window=None, frame=False, shots=None, ctx=0):
    """Dense float64 reference (B, N, H, D), masks built token by token."""
    N = NV + NT
    is_video = torch.arange(N) < NV if video_first else torch.arange(N) >= NT
    vi, ti = torch.nonzero(is_video).flatten(), torch.nonzero(~is_video).flatten()
    probs = logits.double().softmax(-1)
    member = topk_membership_ref(probs, K)  # (B, NV, M) bool
    routed = 0
    for m in range(M):
        mask = torch.zeros(B, N, N, dtype=torch.bool)
        for b in range(B):
            g = member[b, :, m]
            mask[b][vi[:, None], vi[None, :]] = g[:, None] & g[None, :]
            mask[b][vi[:, None], ti[None, :]] = g[:, None] & valid[b][None, :]
        routed = routed + (probs[..., m] * member[..., m])[..., None, None] * masked_attention_ref(q, k, v, mask)[:, vi]
    branches = [routed]
    windows = ([(window, ctx)] if window else []) + ([((1, GRID[1], GRID[2]), 0)] if frame else [])
    for win, c in windows:
        mask = torch.zeros(B, N, N, dtype=torch.bool)
        mask[:, vi[:, None], vi[None, :]] = window_mask_ref(GRID, win, shots, c)
        mask[:, vi[:, None], ti[None, :]] = valid[:, None, :]
        branches.append(masked_attention_ref(q, k, v, mask)[:, vi])
    mask = torch.zeros(B, N, N, dtype=torch.bool)
    key_ok = torch.ones(B, N, dtype=torch.bool)
    key_ok[:, ti] = valid
    mask[:, ti] = key_ok[:, None, :]
    if pad_queries == "zero":
        mask[:, ti] &= valid[:, :, None]
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    out[:, vi] = sum(branches) / len(branches)
    out[:, ti] = masked_attention_ref(q, k, v, mask)[:, ti]
    return out


CASES = [(b, "cpu", vf, pad) for b in ("torch", "cpu") for vf in (True, False) for pad in ("attend", "zero")]
CASES += [("triton", "cpu", False, "zero")]  # one case through the Triton interpreter keeps the test time down
CASES += [(b, "cuda", vf, pad) for b in gpu_backends() for vf in (True, False) for pad in ("attend", "zero")]


@pytest.mark.parametrize("backend,device,video_first,pad_queries", CASES)
def test_joint_attention_matches_dense_reference_with_gradients(backend, device, video_first, pad_queries):
    q, k, v = (torch.randn(B, NV + NT, H, D, requires_grad=True) for _ in range(3))
    logits = torch.randn(B, NV, M, requires_grad=True)
    got = joint_moga_attention(
        q.to(device), k.to(device), v.to(device), logits.to(device), num_text=NT, video_first=video_first,
        text_valid=VALID.to(device), pad_queries=pad_queries, top_k=K, grid=GRID, window=(2, 1, 2),
        frame_attention=True, shot_starts=[1], context_frames=1, backend=backend,
    ).cpu()  # fmt: skip
    want = joint_ref(q, k, v, logits, VALID, video_first, pad_queries, (2, 1, 2), True, [1], 1)
    assert rel_err(got, want) < 1e-5
    if pad_queries == "zero":
        text = slice(NV, None) if video_first else slice(0, NT)
        assert torch.equal(got[:, text][~VALID], torch.zeros_like(got[:, text][~VALID]))
    assert_weighted_grads_match(got, want, (q, k, v, logits), "q k v logits".split())


def test_one_group_is_dense_attention_over_valid_keys():
    q, k, v = (torch.randn(B, NV + NT, H, D) for _ in range(3))
    got = joint_moga_attention(q, k, v, torch.zeros(B, NV, 1), num_text=NT, video_first=True, text_valid=VALID)
    key_ok = torch.cat([torch.ones(B, NV, dtype=torch.bool), VALID], dim=1)
    want = masked_attention_ref(q, k, v, key_ok[:, None, :].expand(B, NV + NT, -1))
    assert rel_err(got, want) < 1e-5


def test_bad_arguments_raise():
    q = torch.randn(B, NV + NT, H, D)
    logits = torch.randn(B, NV, M)
    with pytest.raises(ValueError, match="router_logits"):
        joint_moga_attention(q, q, q, logits[:, 1:], num_text=NT, video_first=True)
    with pytest.raises(ValueError, match="text_valid"):
        joint_moga_attention(q, q, q, logits, num_text=NT, video_first=True, text_valid=VALID.long())
    with pytest.raises(ValueError, match="pad_queries"):
        joint_moga_attention(q, q, q, logits, num_text=NT, video_first=True, pad_queries="drop")
    with pytest.raises(ValueError, match="grid"):
        joint_moga_attention(q, q, q, logits, num_text=NT, video_first=True, frame_attention=True)
    with pytest.raises(ValueError, match="grid"):
        joint_moga_attention(q, q, q, logits, num_text=NT, video_first=True, window=(1, 1, 1), grid=(2, 2, 2))
