"""The optional recipe backends (flash_attn, xformers): availability detection, clean refusal, and the
gather / varlen call / zero-fill logic around the library kernel.

Neither library is installed on any machine we run on. The wrapper logic is checked by handing it small
reference implementations of the libraries' documented interfaces (``flash_attn_varlen_func``;
``memory_efficient_attention`` + ``BlockDiagonalMask.from_seqlens``), written here with per-segment SDPA.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import moga
from moga.backends import flash_attn_backend, select_backend, xformers_backend
from moga.layout import SegmentLayout, routed_layout
from moga.reference import group_attention_ref
from tests.utils import rel_err

BACKENDS = {"flash_attn": (flash_attn_backend, "flash_attn"), "xformers": (xformers_backend, "xformers")}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_availability_matches_importability(name: str) -> None:
    mod, package = BACKENDS[name]
    importable = importlib.util.find_spec(package) is not None
    if importable:
        pytest.skip(f"{package} is installed here; the absent case cannot be checked")
    assert mod.is_available() is False
    assert name not in moga.available_backends()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_unavailable_backend_is_refused_with_its_name(name: str) -> None:
    if BACKENDS[name][0].is_available():
        pytest.skip(f"{name} is installed here")
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match=name):
        moga.group_attention(q, q, q, torch.zeros(1, 8, dtype=torch.int64), num_groups=1, backend=name)
    with pytest.raises(ValueError, match=name):
        select_backend(name, q[0], q[0], q[0])


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_unsupported_reason_names_device_and_layout(name: str) -> None:
    mod = BACKENDS[name][0]
    cpu = torch.zeros(4, 2, 64, dtype=torch.float16)
    assert "CUDA" in mod.unsupported_reason(cpu, cpu, cpu)
    offsets = torch.tensor([0, 4])
    index = torch.arange(4)
    cross = SegmentLayout(index, offsets, index.clone(), offsets.clone(), num_tokens=4)
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert mod.unsupported_reason(gpu, gpu, gpu) is None
        assert "same_qk" in mod.unsupported_reason(gpu, gpu, gpu, cross)
    with pytest.raises(ValueError, match=name):
        mod.segment_attention(cpu, cpu, cpu, cross, 0.125)


def _segment_sdpa(q, k, v, scale):
    """q (n, Hq, D), k/v (n, Hkv, D) -> (n, Hq, D): one segment's attention, GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(rep, 1).transpose(0, 1) for t in (k, v))
    return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, scale=scale).transpose(0, 1)


def fake_flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's documented contract; rows past cu_q[-1] are left unwritten (NaN here)."""
    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32 and not causal
    assert max_q == int(torch.diff(cu_q).max()) and max_k == int(torch.diff(cu_k).max())
    out = torch.full_like(q, float("nan"))
    for s in range(cu_q.numel() - 1):
        a, b, c, d = int(cu_q[s]), int(cu_q[s + 1]), int(cu_k[s]), int(cu_k[s + 1])
        if b > a:
            out[a:b] = _segment_sdpa(q[a:b], k[c:d], v[c:d], softmax_scale)
    return out


class FakeBlockDiagonalMask:
    def __init__(self, seqlens):
        self.seqlens = seqlens

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        assert kv_seqlen is None and all(n > 0 for n in q_seqlen)
        return cls(list(q_seqlen))


def fake_memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
    """xformers' BMGHK contract: (1, L, G, H, D) with k/v broadcast over H; block-diagonal attn_bias."""
    B, L, G, H, D = q.shape
    assert B == 1 and k.shape == v.shape == q.shape and sum(attn_bias.seqlens) == L
    out = torch.empty_like(q)
    start = 0
    for n in attn_bias.seqlens:
        sl = slice(start, start + n)
        out[0, sl] = _segment_sdpa(
            q[0, sl].reshape(n, G * H, D), k[0, sl].reshape(n, G * H, D), v[0, sl].reshape(n, G * H, D), scale
        ).view(n, G, H, D)
        start += n
    return out


RUNNERS = {
    "flash_attn": lambda q, k, v, lay, s: flash_attn_backend.run_varlen(q, k, v, lay, s, fake_flash_attn_varlen_func),
    "xformers": lambda q, k, v, lay, s: xformers_backend.run_block_diagonal(
        q, k, v, lay, s, fake_memory_efficient_attention, FakeBlockDiagonalMask
    ),
}


@pytest.mark.parametrize("name", sorted(RUNNERS))
@pytest.mark.parametrize("hkv", [1, 4])
def test_recipe_wrapper_matches_reference(name: str, hkv: int) -> None:
    """Ragged groups, an empty group, a singleton, padding tokens (id -1), GQA; gradients through the gathers."""
    N, M, Hq, D = 67, 5, 4, 32
    ids = torch.tensor([0] * 30 + [1] * 20 + [3] + [4] * 12 + [-1] * 4)[torch.randperm(N)]  # group 2 empty
    q = torch.randn(N, Hq, D, requires_grad=True)
    k, v = (torch.randn(N, hkv, D, requires_grad=True) for _ in range(2))
    routed = routed_layout(ids.view(1, N, 1), M)
    scale = D**-0.5
    out = RUNNERS[name](q, k, v, routed.segments, scale)[routed.position]  # back to token order
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = group_attention_ref(*(t.unsqueeze(0) for t in leaves), ids.view(1, N), scale)[0]
    assert rel_err(out, ref) < 1e-5
    assert torch.all(out[ids < 0] == 0)  # padding rows zero, not the library's unwritten memory
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), dout.float())
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    for g, r in zip(grads, ref_grads, strict=True):
        assert rel_err(g, r) < 1e-5
