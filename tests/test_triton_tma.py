"""The contiguous (TMA) kernels and the triton_tma backend, against float64 references.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py), which executes tensor-descriptor
loads and stores with the same clipping at the descriptor's shape as TMA; warp specialisation and pipelining are
ignored there (they change the schedule, not the arithmetic) and are checked by the compile check instead.
bf16 tiles are upcast in the interpreter (its bf16 tl.dot is broken); fp16 runs as on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from moga import _alloc, group_attention, moga_attention
from moga.backends import get_backend, select_backend
from moga.kernels.segment_attention.naive import segment_attention_naive
from moga.layout import SegmentLayout
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import TOL, as_double_leaves, qkv, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
backend = get_backend("triton_tma")
pytestmark = pytest.mark.skipif(
    backend is None or not backend.is_available(), reason="triton_tma needs a Hopper GPU or TRITON_INTERPRET=1"
)


def _contiguous_layout(q_sizes: list[int], k_sizes: list[int], q_tail: int, k_tail: int) -> SegmentLayout:
    """Segments of the given query/key sizes laid out in order (index = identity), plus unsegmented tails."""
    q_off = torch.tensor([0, *q_sizes]).cumsum(0)
    k_off = torch.tensor([0, *k_sizes]).cumsum(0)
    Lq, Lk = int(q_off[-1]) + q_tail, int(k_off[-1]) + k_tail
    T = max(Lq, Lk)
    return SegmentLayout(
        q_index=torch.arange(Lq, device=DEVICE),
        q_offsets=q_off.to(DEVICE),
        k_index=torch.arange(Lk, device=DEVICE),
        k_offsets=k_off.to(DEVICE),
        num_tokens=T,
    )


def _check_kernels(q_sizes, k_sizes, q_tail, k_tail, Hq, Hkv, D, dtype) -> None:
    """Kernel pair vs float64 naive.py on one layout: out, lse, dq, dk, dv; every buffer NaN-poisoned first."""
    from moga.kernels.contiguous_attention import contiguous_attention_bwd, contiguous_attention_fwd

    layout = _contiguous_layout(q_sizes, k_sizes, q_tail, k_tail)
    Lq, Lk = layout.q_index.numel(), layout.k_index.numel()
    q = torch.randn(Lq, Hq, D, device=DEVICE).to(dtype)
    k = torch.randn(Lk, Hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(Lk, Hkv, D, device=DEVICE).to(dtype)
    dout = torch.randn(Lq, Hq, D, device=DEVICE).to(dtype)
    scale = D**-0.5
    with _alloc.poisoned_outputs():
        out, lse = contiguous_attention_fwd(q, k, v, layout.q_offsets, layout.k_offsets, scale)
        dq, dk, dv = contiguous_attention_bwd(dout, q, k, v, out, lse, layout.q_offsets, layout.k_offsets, scale)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has unwritten (NaN) elements"
    # naive.py reads q/k/v through the layout's token rows: pad the shorter side to T rows.
    T = layout.num_tokens
    q64, k64, v64 = (
        torch.cat([t.double(), t.new_zeros(T - t.shape[0], *t.shape[1:]).double()]).requires_grad_(True)
        for t in (q, k, v)
    )
    ref, ref_lse = segment_attention_naive(q64, k64, v64, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    tol = TOL[torch.float16] if dtype == torch.float16 else 1e-2
    assert rel_err(out, ref) < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite.cpu().to(lse.device))
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-3)
    for name, g, r, x in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, (q, k, v), strict=True):
        assert rel_err(g, r[: x.shape[0]]) < tol, (name, rel_err(g, r[: x.shape[0]]))
    # Rows outside every segment: zero outputs and zero gradients.
    assert (out[int(layout.q_offsets[-1]) :] == 0).all() and (dq[int(layout.q_offsets[-1]) :] == 0).all()
    assert (dk[int(layout.k_offsets[-1]) :] == 0).all() and (dv[int(layout.k_offsets[-1]) :] == 0).all()


@pytest.mark.parametrize(
    "q_sizes,k_sizes,q_tail,k_tail,Hq,Hkv",
    [
        ([0, 1, 37, 70, 5, 20], [3, 1, 37, 0, 40, 50], 7, 2, 4, 2),  # ragged, empty, singleton, no-key, GQA, tails
        ([97], [97], 0, 0, 2, 2),  # one segment = dense attention, not a multiple of any block
        ([33, 16, 64], [16, 33, 1], 0, 5, 3, 1),  # MQA, q and k lengths differ per segment
    ],
)
def test_kernels_vs_float64_fp16(q_sizes, k_sizes, q_tail, k_tail, Hq, Hkv) -> None:
    _check_kernels(q_sizes, k_sizes, q_tail, k_tail, Hq, Hkv, 64, torch.float16)


def test_kernels_head_dim_128_and_bf16() -> None:
    _check_kernels([40, 0, 25], [30, 9, 25], 3, 0, 2, 1, 128, torch.float16)
    _check_kernels([40, 1, 25], [30, 9, 0], 0, 4, 2, 2, 64, torch.bfloat16)


def test_lpt_table_orders_longest_work_first_and_counts_nonempty_rows() -> None:
    from moga.kernels.contiguous_attention.tiles import lpt_tile_table

    q_off = torch.tensor([0, 10, 10, 90, 95])  # segments of 10, 0, 80, 5 queries
    k_off = torch.tensor([0, 500, 510, 530, 531])  # keys: 500, 10, 20, 1
    table, count = lpt_tile_table(q_off, k_off, 100, 32, include_tail=True)
    assert table.dtype == torch.int32 and int(count) == 1 + 3 + 1 + 1  # 10 | 80 = 3 tiles | 5 | tail of 5
    real = table[: int(count)]
    work = (real[:, 3] - real[:, 2]).tolist()
    assert work == sorted(work, reverse=True) and work[0] == 500
    covered = sorted(p for start, end, _, _ in real.tolist() for p in range(start, min(start + 32, end)))
    assert covered == list(range(100))  # every position exactly once, the tail included
    assert (table[int(count) :] == 0).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_moga_attention_through_backend_vs_reference(top_k: int) -> None:
    """Public API, routed and gated (top_k=2: repeated tokens, the gathers' backward sums them). Router grads too."""
    B, N, Hq, Hkv, D, M = 2, 90, 2, 1, 64, 3
    q, k, v = (t.to(DEVICE) for t in qkv(B, N, Hq, Hkv, D, torch.float16))
    logits = (2 * torch.randn(B, N, M, device=DEVICE)).requires_grad_(True)
    out = moga_attention(q, k, v, logits, top_k=top_k, backend="triton_tma")
    q64, k64, v64, l64 = as_double_leaves(q, k, v, logits)
    ref = moga_attention_ref(q64, k64, v64, l64, top_k=top_k)
    assert out.dtype == torch.float16 and rel_err(out, ref) < TOL[torch.float16]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, logits), dout)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64, l64), dout.double())
    for name, g, r in zip(("dq", "dk", "dv", "dlogits"), grads, ref_grads, strict=True):
        assert rel_err(g, r) < TOL[torch.float16], (name, rel_err(g, r))


def test_group_attention_with_padding_through_backend() -> None:
    B, N, H, D = 1, 80, 2, 128
    ids = torch.tensor([0] * 30 + [1] + [2] * 29 + [-1] * 20, device=DEVICE).view(B, N)
    q, k, v = (t.to(DEVICE) for t in qkv(B, N, H, H, D, torch.float16))
    with _alloc.poisoned_outputs():
        out = group_attention(q, k, v, ids, num_groups=3, backend="triton_tma")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = as_double_leaves(q, k, v)
    assert rel_err(out, group_attention_ref(q64, k64, v64, ids)) < TOL[torch.float16]
    pad = ids[0] < 0
    assert (out[0, pad] == 0).all() and all((g[0, pad] == 0).all() for g in grads)
    assert all(not torch.isnan(g).any() for g in grads)


def test_unsupported_inputs_are_refused_with_reasons() -> None:
    probe = torch.zeros(4, 2, 64, dtype=torch.float16, device=DEVICE)
    assert backend.unsupported_reason(probe, probe, probe) is None
    fp32 = probe.float()
    assert "float16 and bfloat16" in backend.unsupported_reason(fp32, fp32, fp32)
    d96 = torch.zeros(4, 2, 96, dtype=torch.float16, device=DEVICE)
    assert "head dim 96" in backend.unsupported_reason(d96, d96, d96)
    ids = torch.zeros(1, 4, 2, dtype=torch.int64, device=DEVICE)
    ids[..., 1] = 1
    from moga._determinism import deterministic_mode
    from moga.layout import routed_layout

    repeated = routed_layout(ids, 2).segments  # top_k = 2: every token at two positions
    with deterministic_mode(True):
        assert "deterministic" in backend.unsupported_reason(probe, probe, probe, repeated)
        with pytest.raises(ValueError, match="deterministic"):
            select_backend("triton_tma", probe, probe, probe, repeated)
    assert backend.unsupported_reason(probe, probe, probe, repeated) is None
    q = torch.zeros(1, 8, 2, 96, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head dim 96"):
        group_attention(q, q, q, torch.zeros(1, 8, dtype=torch.int64, device=DEVICE), backend="triton_tma")


def test_compile_specs_cover_the_hopper_table() -> None:
    from moga.kernels.contiguous_attention import compile_specs
    from moga.kernels.contiguous_attention.configs import HOPPER

    names = [s.name for s in compile_specs()]
    for (kernel, D), cfg in HOPPER.items():
        tag = f"D={D},BM={cfg.block_m},BN={cfg.block_n},w{cfg.num_warps},s{cfg.num_stages}"
        prefix = "contiguous_attn_fwd[" if kernel == "fwd" else f"contiguous_attn_bwd_{kernel}["
        assert sum(n.startswith(prefix) and tag in n for n in names) >= 2, (kernel, D)
    assert all(s.archs == ("sm_90a",) for s in compile_specs())


def test_backend_and_kernel_tables_agree() -> None:
    from moga.kernels.contiguous_attention import configs

    assert backend.HEAD_DIMS == configs.HEAD_DIMS and backend.DTYPES == configs.DTYPES
