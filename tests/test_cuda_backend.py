"""The compiled CUDA backend (csrc/cuda) against float64 references.

GPU tests (marked ``gpu``) skip cleanly without a CUDA device and a CUDA build of ``moga._C``; on a lent GPU they
check forward and dq/dk/dv/router gradients through the public functions, fp16 and bf16, D = 64 and 128, ragged,
empty, singleton and padded groups, GQA, top_k = 2, sizes that are not multiples of the tiles, poisoned outputs,
and the CUDA sort_by_segment against a stable torch.sort. The ptxas test runs anywhere nvcc is installed: it
compiles csrc/cuda/*.cu for sm_80 and sm_90a and fails if a production attention kernel spills.
"""

from __future__ import annotations

import os

import pytest
import torch

import moga
from moga import _ops
from moga._alloc import poisoned_outputs
from moga.backends import _compiled, get_backend
from moga.layout import SegmentLayout
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import as_double_leaves, load_bench_script, rel_err

DEVICE = "cuda"
BACKEND = "cuda"
HAS_CUDA_BACKEND = torch.cuda.is_available() and get_backend("cuda") is not None and get_backend("cuda").is_available()
requires_cuda_backend = pytest.mark.skipif(
    not HAS_CUDA_BACKEND, reason="needs a CUDA device and moga._C built with its CUDA part"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF_DTYPES = [torch.float16, torch.bfloat16]


# ---- no GPU needed ---------------------------------------------------------------------------------------------


def test_ptxas_parser_flags_spills_and_smem():
    """The spill check can fail: a synthetic ptxas log with spills and oversized smem is reported."""
    report = load_bench_script("ptxas_report")
    log = (
        "ptxas info    : Compiling entry function '_ZN9moga_cuda23segment_attn_fwd_kernelI6__halfLi128EEEvv' "
        "for 'sm_80'\n"
        "ptxas info    : Function properties for _ZN9moga_cuda23segment_attn_fwd_kernelI6__halfLi128EEEvv\n"
        "    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 200000 bytes smem, 544 bytes cmem[0]\n"
        "ptxas info    : Compiling entry function '_ZN9moga_cuda16tile_fill_kernelEv' for 'sm_80'\n"
        "ptxas info    : Function properties for _ZN9moga_cuda16tile_fill_kernelEv\n"
        "    0 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 31 registers, used 0 barriers\n"
    )
    rows = report.parse_ptxas(log, "sm_80", "x.cu")
    by_base = {r.base: r for r in rows}
    fwd = by_base["segment_attn_fwd_kernel"]
    assert fwd.name == "segment_attn_fwd_kernel<fp16,D=128>" and fwd.production
    assert (fwd.registers, fwd.spill_stores, fwd.spill_loads, fwd.static_smem) == (255, 12, 16, 200000)
    assert not by_base["tile_fill_kernel"].production  # helper kernels are listed, not gated
    found = report.problems(rows)
    assert len(found) == 2 and "spills" in found[0] and "shared memory" in found[1]


@pytest.mark.skipif(load_bench_script("ptxas_report").find_nvcc() is None, reason="nvcc not installed")
def test_production_kernels_do_not_spill():
    """Every production attention kernel compiles for sm_80 and sm_90a without spills and fits shared memory."""
    report = load_bench_script("ptxas_report")
    rows = report.compile_report(report.find_nvcc())
    for arch in report.ARCHS:
        prod = sorted(r.name for r in rows if r.production and r.arch == arch)
        # fwd, dq, dkdv x fp16/bf16 x D = 64/128
        assert len(prod) == 12, f"{arch}: expected 12 production kernels, got {prod}"
        assert all(r.smem > 0 for r in rows if r.production and r.arch == arch), "dynamic smem not resolved"
    assert report.problems(rows) == [], report.format_table(rows)


def test_cuda_backend_refuses_cpu_tensors():
    mod = get_backend("cuda")
    assert mod is not None
    t = torch.zeros(4, 2, 64, dtype=torch.float16)
    assert "CUDA" in mod.unsupported_reason(t, t, t) or "cuda" in mod.unsupported_reason(t, t, t)
    q, k, v = (torch.zeros(1, 4, 2, 64, dtype=torch.float16) for _ in range(3))
    with pytest.raises(ValueError, match="cuda"):
        moga.group_attention(q, k, v, torch.zeros(1, 4, dtype=torch.long), backend="cuda")


# ---- GPU: helpers ----------------------------------------------------------------------------------------------


def _rand_qkv(B, N, Hq, Hkv, D, dtype):
    g = torch.Generator(device="cpu").manual_seed(B * 1000 + N + Hq + D)
    mk = lambda h: torch.randn(B, N, h, D, generator=g).to(DEVICE, dtype).requires_grad_(True)  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


def _bound(dtype, torch_err):
    """fp16: the project's 1e-3 (or 2x PyTorch's own error, if that is larger, for gradients); bf16: 2x the error
    of the bf16 PyTorch (torch backend) implementation on the same inputs."""
    return max(1e-3, 2 * torch_err) if dtype == torch.float16 else 2 * torch_err


def _run(fn, leaves, dout):
    """Output and input gradients of fn(*leaves) under poisoned kernel outputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    with poisoned_outputs():
        out = fn(*leaves)
        out.backward(dout.to(out.dtype))
    return [out] + [t.grad for t in leaves]


def _check_against_reference(fn_backend, ref_fn, leaves, names):
    """fn_backend(backend, *leaves) on "cuda" and "torch" vs ref_fn(*float64 leaves); cuda within _bound."""
    dbl = as_double_leaves(*leaves)
    ref = ref_fn(*dbl)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    want = [ref] + [t.grad for t in dbl]
    got = _run(lambda *x: fn_backend(BACKEND, *x), leaves, dout)
    base = _run(lambda *x: fn_backend("torch", *x), leaves, dout)
    dtype = leaves[0].dtype
    for name, g, b, w in zip(["out"] + names, got, base, want, strict=True):
        assert g.dtype == b.dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite entries (unwritten poisoned output?)"
        if w.norm() == 0:  # e.g. dq, dk when every group is one token: zero up to rounding, no relative error
            assert g.abs().max() < 1e-2, f"{name}: should be zero, max |value| {g.abs().max():.3e}"
            continue
        err, torch_err = rel_err(g, w), rel_err(b, w)
        assert err <= _bound(dtype, torch_err), f"{name}: rel err {err:.3e}, torch backend {torch_err:.3e}"


def _group_ids(case, B, N):
    """Group ids (B, N) exercising ragged, empty, singleton and padded groups; returns (ids, num_groups)."""
    g = torch.Generator(device="cpu").manual_seed(N)
    if case == "dense":  # one group = full attention
        return torch.zeros(B, N, dtype=torch.long), 1
    if case == "singletons":  # every token alone
        return torch.arange(N).repeat(B, 1), N
    # ragged: skewed sizes; group 3 never used (empty); token 5 alone in group 7; ~10% padding
    probs = torch.tensor([0.45, 0.25, 0.15, 0.0, 0.1, 0.05, 0.0, 0.0])
    ids = torch.multinomial(probs, B * N, replacement=True, generator=g).view(B, N)
    ids[:, 5] = 7
    ids[torch.rand(B, N, generator=g) < 0.1] = -1
    return ids, 8


# ---- GPU: attention --------------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize(
    "case,B,N,Hq,Hkv", [("ragged", 2, 333, 4, 2), ("dense", 1, 130, 2, 2), ("singletons", 1, 70, 4, 1)]
)
def test_group_attention_matches_reference(dtype, D, case, B, N, Hq, Hkv):
    ids, M = _group_ids(case, B, N)
    ids = ids.to(DEVICE)
    q, k, v = _rand_qkv(B, N, Hq, Hkv, D, dtype)
    _check_against_reference(
        lambda be, q, k, v: moga.group_attention(q, k, v, ids, num_groups=M, backend=be),
        lambda q, k, v: group_attention_ref(q, k, v, ids),
        [q, k, v],
        ["dq", "dk", "dv"],
    )
    out = moga.group_attention(q, k, v, ids, num_groups=M, backend=BACKEND)
    assert (out[ids < 0] == 0).all(), "padding queries must get exactly zero output"


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moga_attention_matches_reference(dtype, D, top_k):
    """Gated routed attention incl. the router gradient; top_k = 2 makes every token appear twice (atomics)."""
    B, N, Hq, Hkv, M = 2, 200, 4, 2, 5
    q, k, v = _rand_qkv(B, N, Hq, Hkv, D, dtype)
    logits = (3 * torch.randn(B, N, M)).to(DEVICE).requires_grad_(True)
    _check_against_reference(
        lambda be, q, k, v, r: moga.moga_attention(q, k, v, r, top_k=top_k, backend=be),
        lambda q, k, v, r: moga_attention_ref(q, k, v, r, top_k=top_k),
        [q, k, v, logits],
        ["dq", "dk", "dv", "drouter"],
    )


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_strided_and_misaligned_qkv(dtype):
    """q, k, v as views into one packed (B, N, 3, H, D) tensor (token stride 3*H*D), and a q whose storage offset
    breaks 16-byte alignment (the binding copies it): results equal those of contiguous copies, bit for bit
    (top-1 routing: no atomics), and match the float64 reference."""
    B, N, H, D = 1, 257, 2, 128
    packed = torch.randn(B, N, 3, H, D).to(DEVICE, dtype).requires_grad_(True)
    q, k, v = packed.unbind(2)
    ids = torch.randint(0, 3, (B, N)).to(DEVICE)
    out = moga.group_attention(q, k, v, ids, num_groups=3, backend=BACKEND)
    dout = torch.randn_like(out)
    out.backward(dout)

    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in (q, k, v))
    out_c = moga.group_attention(qc, kc, vc, ids, num_groups=3, backend=BACKEND)
    out_c.backward(dout)
    assert torch.equal(out, out_c)
    for i, leaf in enumerate((qc, kc, vc)):
        assert torch.equal(packed.grad[:, :, i], leaf.grad)

    shifted = torch.empty(q.numel() + 4, dtype=dtype, device=DEVICE)[4:].view(q.shape).copy_(q)  # 8-byte offset
    assert shifted.data_ptr() % 16 != 0
    assert torch.equal(moga.group_attention(shifted, kc, vc, ids, num_groups=3, backend=BACKEND), out_c)

    ref = group_attention_ref(q.double(), k.double(), v.double(), ids)
    torch_err = rel_err(moga.group_attention(qc, kc, vc, ids, num_groups=3, backend="torch"), ref)
    assert rel_err(out, ref) <= _bound(dtype, torch_err)


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_ops_write_every_element(dtype):
    """Direct op calls under poisoned outputs: positions past the last segment get zero rows and lse = -inf, and
    tokens that no segment reads get zero gradients; nothing is left NaN. Also top_k-style repeated tokens."""
    T, Hq, Hkv, D = 150, 4, 2, 64
    q = torch.randn(T, Hq, D).to(DEVICE, dtype)
    k, v = (torch.randn(T, Hkv, D).to(DEVICE, dtype) for _ in range(2))
    # Segments: [0, 70) rows 0..69; an empty one; [70, 71) singleton; keys of segment 0 include repeated rows.
    q_index = torch.cat([torch.arange(71), torch.tensor([140, 141])]).to(DEVICE)  # 2 tail positions
    q_offsets = torch.tensor([0, 70, 70, 71]).to(DEVICE)
    k_index = torch.cat([torch.arange(70), torch.arange(10), torch.tensor([70])]).to(DEVICE)
    k_offsets = torch.tensor([0, 80, 80, 81]).to(DEVICE)
    layout = SegmentLayout(q_index, q_offsets, k_index, k_offsets, num_tokens=T, q_unique=True, k_unique=False)
    with poisoned_outputs():
        out, lse = _compiled.fwd(q, k, v, layout, 0.125)
        dout = torch.randn_like(out)
        dq, dk, dv = _compiled.bwd(dout, q, k, v, out, lse, layout, 0.125)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (out[71:] == 0).all() and torch.isneginf(lse[:, 71:]).all()
    for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
        assert not g.isnan().any(), f"{name} has unwritten (NaN) entries"
        assert (g[71:] == 0).all(), f"{name} of tokens no segment reads must be zero"
    # Compare the segment rows with a float64 computation of the same layout.
    for s, (qa, qb, ka, kb) in enumerate([(0, 70, 0, 80), (70, 71, 80, 81)]):
        qs = q[q_index[qa:qb]].double()
        ks = k[k_index[ka:kb]].double().repeat_interleave(Hq // Hkv, 1)
        vs = v[k_index[ka:kb]].double().repeat_interleave(Hq // Hkv, 1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * 0.125
        ref = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)
        # PyTorch's own error in this dtype (products in dtype, softmax in fp32) sets the bar
        qs_lp, ks_lp, vs_lp = (t.to(dtype) for t in (qs, ks, vs))
        probs_lp = (torch.einsum("ihd,jhd->hij", qs_lp, ks_lp).float() * 0.125).softmax(-1).to(dtype)
        torch_err = rel_err(torch.einsum("hij,jhd->ihd", probs_lp, vs_lp), ref)
        assert rel_err(out[qa:qb], ref) <= _bound(dtype, torch_err), f"segment {s}"
        assert torch.allclose(lse[:, qa:qb].double(), scores.logsumexp(-1), atol=1e-3), f"segment {s} lse"


def _segment_attention_dense(q, k, v, layout, scale, dout):
    """out, lse, dq, dk, dv of the segment-attention op contract, segment by segment with autograd, in the dtype of
    q (float64 for the reference, the kernel's dtype for the PyTorch baseline error)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    Lq, (_, Hq, D), group = layout.q_index.numel(), q.shape, q.shape[1] // k.shape[1]
    out = torch.zeros(Lq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.full((Hq, Lq), float("-inf"), dtype=torch.float64, device=q.device)
    qo, ko = layout.q_offsets.tolist(), layout.k_offsets.tolist()
    for s in range(len(qo) - 1):
        if qo[s] == qo[s + 1] or ko[s] == ko[s + 1]:
            continue
        qs = q[layout.q_index[qo[s] : qo[s + 1]]]
        ks = k[layout.k_index[ko[s] : ko[s + 1]]].repeat_interleave(group, 1)
        vs = v[layout.k_index[ko[s] : ko[s + 1]]].repeat_interleave(group, 1)
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        out[qo[s] : qo[s + 1]] = torch.einsum("hij,jhd->ihd", scores.softmax(-1), vs)
        lse[:, qo[s] : qo[s + 1]] = scores.double().logsumexp(-1).detach()
    out.backward(dout.to(out.dtype))
    return out.detach(), lse, q.grad, k.grad, v.grad


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_ops_asymmetric_segments_repeated_tokens(dtype, D):
    """Direct op calls on a layout the group/MoGA paths never build: segments with queries but no keys, keys but no
    queries, different query and key counts per segment (D = 128 splits the dK/dV kernel's query loop into 32-row
    steps), query and key tokens repeated across segments (fp32 atomics), GQA 4:1 and tail positions. Forward and
    token-space gradients vs float64; every poisoned output element written."""
    g = torch.Generator(device="cpu").manual_seed(D)
    T, Hq, Hkv, scale = 300, 4, 1, D**-0.5
    q_lens, k_lens = [0, 40, 1, 100, 37, 0, 65], [5, 0, 1, 100, 90, 0, 64]
    q_index = torch.cat([torch.randperm(T, generator=g)[: sum(q_lens)], torch.tensor([3, 3, 7])])  # 3 tail positions
    q_index[50] = q_index[120]  # one query token in two segments
    k_index = torch.randint(0, T, (sum(k_lens),), generator=g)  # keys repeat within and across segments
    cum = lambda lens: torch.tensor([0] + lens).cumsum(0)  # noqa: E731
    layout = SegmentLayout(
        q_index.to(DEVICE),
        cum(q_lens).to(DEVICE),
        k_index.to(DEVICE),
        cum(k_lens).to(DEVICE),
        num_tokens=T,
        q_unique=False,
        k_unique=False,
    )
    q = torch.randn(T, Hq, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(T, Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    dout = torch.randn(q_index.numel(), Hq, D, generator=g).to(DEVICE, dtype)
    with poisoned_outputs():
        out, lse = _compiled.fwd(q, k, v, layout, scale)
        grads = _compiled.bwd(dout, q, k, v, out, lse, layout, scale)
    want = _segment_attention_dense(*(t.double() for t in (q, k, v)), layout, scale, dout.double())
    base = _segment_attention_dense(q, k, v, layout, scale, dout)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want[1])), "lse = -inf exactly where a query has no keys"
    finite = torch.isfinite(want[1])
    assert (lse[finite].double() - want[1][finite]).abs().max() < 1e-3
    names = ["out", "dq", "dk", "dv"]
    for name, got, b, w in zip(names, (out, *grads), (base[0], *base[2:]), (want[0], *want[2:]), strict=True):
        assert not got.isnan().any(), f"{name}: unwritten (NaN) entries"
        err, torch_err = rel_err(got, w), rel_err(b, w)
        assert err <= _bound(dtype, torch_err), f"{name}: rel err {err:.3e}, PyTorch {dtype} {torch_err:.3e}"
    assert (out[sum(q_lens) :] == 0).all()


@pytest.mark.gpu
@requires_cuda_backend
def test_bwd_misaligned_dout():
    """A contiguous dout whose storage offset is not 16-byte aligned (its rows are gathered with cp.async): the
    binding copies it, so the gradients equal those of an aligned dout bit for bit (unique tokens: no atomics)."""
    T, H, D, dtype = 130, 2, 64, torch.float16
    q, k, v = (torch.randn(T, H, D).to(DEVICE, dtype) for _ in range(3))
    index = torch.arange(T, device=DEVICE)
    layout = SegmentLayout(
        index, torch.tensor([0, 70, T], device=DEVICE), index, torch.tensor([0, 70, T], device=DEVICE), num_tokens=T
    )
    out, lse = _compiled.fwd(q, k, v, layout, 0.125)
    dout = torch.randn_like(out)
    shifted = torch.empty(dout.numel() + 4, dtype=dtype, device=DEVICE)[4:].view(dout.shape).copy_(dout)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    got = _compiled.bwd(shifted, q, k, v, out, lse, layout, 0.125)
    torch.cuda.synchronize()  # a misaligned cp.async would surface here as a CUDA error
    aligned = _compiled.bwd(dout, q, k, v, out, lse, layout, 0.125)
    for name, a, b in zip(("dq", "dk", "dv"), got, aligned, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@requires_cuda_backend
@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_long_sequence_65k(dtype):
    """N = 65536 tokens in 16 routed groups, checked group by group against float64 attention."""
    N, Hq, Hkv, D, M = 65536, 2, 1, 128, 16
    q, k, v = _rand_qkv(1, N, Hq, Hkv, D, dtype)
    ids = torch.randint(0, M, (1, N)).to(DEVICE)
    out = moga.group_attention(q, k, v, ids, num_groups=M, backend=BACKEND)
    dout = torch.randn_like(out)
    out.backward(dout)
    tq, tk, tv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    torch_out = moga.group_attention(tq, tk, tv, ids, num_groups=M, backend="torch")
    torch_out.backward(dout)
    for m in range(M):
        rows = (ids[0] == m).nonzero().squeeze(1)
        qm, km, vm = (t.detach()[0, rows].double().requires_grad_(True) for t in (q, k, v))
        probs = (torch.einsum("ihd,jhd->hij", qm, km.repeat_interleave(Hq // Hkv, 1)) * D**-0.5).softmax(-1)
        ref = torch.einsum("hij,jhd->ihd", probs, vm.repeat_interleave(Hq // Hkv, 1))
        ref.backward(dout[0, rows].double())
        bound = _bound(dtype, rel_err(torch_out[0, rows], ref))
        assert rel_err(out[0, rows], ref) <= bound, f"group {m} out"
        grads = (("dq", q.grad, tq.grad, qm.grad), ("dk", k.grad, tk.grad, km.grad), ("dv", v.grad, tv.grad, vm.grad))
        for name, got, torch_got, want in grads:
            bound = _bound(dtype, rel_err(torch_got[0, rows], want))
            assert rel_err(got[0, rows], want) <= bound, f"group {m} {name}"


# ---- GPU: no host synchronisation on the hot path -------------------------------------------------------------

GPU_BACKENDS = [b for b in ("cuda", "triton") if b in moga.available_backends()] if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_BACKENDS, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["cuda"])
def test_hot_path_never_synchronises(backend):
    """moga_attention, window_attention (layout cached by the warm-up) and group_attention with num_groups, forward
    and backward, under torch.cuda.set_sync_debug_mode("error"), which raises on any host synchronisation."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    grid, N = (4, 8, 8), 256
    q, k, v = (
        torch.randn(2, N, h, 64, device="cuda", generator=gen).half().requires_grad_(True) for h in (4, 2, 2)
    )
    logits = torch.randn(2, N, 5, device="cuda", generator=gen).requires_grad_(True)
    ids = torch.randint(-1, 5, (2, N), device="cuda", generator=gen)
    calls = [
        lambda: moga.moga_attention(q, k, v, logits, top_k=2, backend=backend),
        lambda: moga.window_attention(q, k, v, grid, (2, 4, 4), shot_starts=[2], context_frames=1, backend=backend),
        lambda: moga.group_attention(q, k, v, ids, num_groups=5, backend=backend),
    ]
    for fn in calls:  # warm-up: kernel compilation and tuning, the window layout's one host-to-device copy
        fn().float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in calls:
            fn().float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- GPU: sort_by_segment --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _ops.ops_available("cuda", "sort_by_segment")),
    reason="needs a CUDA device and moga._C built with its CUDA part",
)
@pytest.mark.parametrize("L,S", [(0, 3), (1, 1), (1000, 7), (65536, 1000), (1 << 20, 40), (70000, 200000)])
def test_sort_by_segment_matches_stable_sort(L, S):
    g = torch.Generator(device="cpu").manual_seed(L + S)
    keys = torch.randint(-1, S, (L,), generator=g)  # -1: excluded
    keys[torch.rand(L, generator=g) < 0.05] = -7
    order, offsets = torch.ops.moga.sort_by_segment(keys.to(DEVICE), S)
    sort_key = torch.where(keys < 0, torch.full_like(keys, S), keys)
    want_order = torch.sort(sort_key, stable=True).indices
    counts = torch.bincount(sort_key, minlength=S + 1)[:S]
    want_offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    assert order.dtype == torch.int64 and offsets.dtype == torch.int64
    assert torch.equal(order.cpu(), want_order)
    assert torch.equal(offsets.cpu(), want_offsets)


# ---- GPU: argument checks --------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_cuda_backend
def test_rejects_unsupported_inputs():
    ids = torch.zeros(1, 8, dtype=torch.long, device=DEVICE)
    for dtype, D, match in ((torch.float32, 64, "float16 and bfloat16"), (torch.float16, 96, "head dim 96")):
        q = torch.zeros(1, 8, 2, D, dtype=dtype, device=DEVICE)
        with pytest.raises(ValueError, match=match):
            moga.group_attention(q, q, q, ids, num_groups=1, backend="cuda")
    q = torch.zeros(8, 2, 64, device=DEVICE)  # fp32 straight into the op: a clear error, not garbage
    idx = torch.arange(8, device=DEVICE)
    off = torch.tensor([0, 8], device=DEVICE)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        torch.ops.moga.segment_attention_fwd(q, q, q, idx, off, idx, off, 0.125)


# ---- the gated un-permute ops on CUDA ----------------------------------------------------------------------------


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("T, K", [(0, 2), (1, 1), (1000, 2), (70_000, 3)])
def test_gated_unpermute_cuda_matches_float64(dtype, T, K):
    """torch.ops.moga.gated_unpermute(_bwd) on CUDA: outputs and both gradients vs float64, every element written."""
    from moga.gate import gated_unpermute

    H, D = 3, 40  # rows of 120 elements: not a multiple of the 256 threads of a CTA
    gen = torch.Generator(device="cpu").manual_seed(0)
    out_seg = torch.randn(T * K, H, D, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    position = torch.randperm(T * K, generator=gen).to(DEVICE)
    gates = torch.rand(T, K, generator=gen).to(DEVICE).requires_grad_(True)
    dout = torch.randn(T, H, D, generator=gen).to(DEVICE, dtype)
    with poisoned_outputs():
        _ops.sync_poison_outputs()
        out = gated_unpermute(out_seg, position, gates, impl="compiled")
        d_seg, d_gates = torch.autograd.grad(out, (out_seg, gates), dout)
    _ops.sync_poison_outputs()
    seg64, gates64 = out_seg.detach().double().requires_grad_(True), gates.detach().double().requires_grad_(True)
    want = (seg64[position].view(T, K, H, D) * gates64[:, :, None, None]).sum(1)
    want_grads = torch.autograd.grad(want, (seg64, gates64), dout.double()) if T else (seg64, gates64)
    tol = 1e-12 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps + 1e-6
    checks = (("out", out, want), ("d_out_seg", d_seg, want_grads[0]), ("d_gates", d_gates, want_grads[1]))
    for name, got, ref in checks:
        assert not got.isnan().any(), name
        if T:
            assert rel_err(got, ref.detach()) <= tol, name
