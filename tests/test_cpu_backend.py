"""The compiled CPU operators (moga._C, csrc/cpu) and the "cpu" backend against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

import moga
from moga import _alloc, _ops
from moga.backends import cpu_backend, torch_backend
from moga.layout import SegmentLayout, routed_layout
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import TOL, as_double_leaves, qkv, rel_err, run_python

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason=f"moga._C not built: {_ops.load_error()}")

ops = torch.ops.moga if _ops.ops_available("cpu") else None


# ---------------------------------------------------------------------------------------------------------------
# sort_by_segment
# ---------------------------------------------------------------------------------------------------------------


def _sort_ref(keys: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    sort_key = torch.where(keys < 0, S, keys)
    order = torch.sort(sort_key, stable=True).indices
    counts = torch.bincount(sort_key, minlength=S + 1)[:S]
    return order, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


@pytest.mark.parametrize(
    "L, S, low",
    [
        (1000, 7, -3),  # random keys with excluded (negative) entries
        (500, 40, 0),  # many empty segments
        (0, 5, 0),  # no entries
        (7, 0, -2),  # no segments: everything excluded
        (300_000, 13, -1),  # large enough for several parallel chunks
    ],
)
def test_sort_by_segment_matches_stable_sort(L: int, S: int, low: int) -> None:
    keys = torch.randint(low, max(S, 1), (L,), dtype=torch.int64) if S > 0 else torch.randint(low, 0, (L,))
    order, offsets = ops.sort_by_segment(keys, S)
    ref_order, ref_offsets = _sort_ref(keys, S)
    assert torch.equal(order, ref_order)
    assert torch.equal(offsets, ref_offsets)


def test_sort_by_segment_only_some_segments_used() -> None:
    keys = torch.tensor([5, 0, 5, -1, 0, 5], dtype=torch.int64)
    order, offsets = ops.sort_by_segment(keys, 8)
    assert order.tolist() == [1, 4, 0, 2, 5, 3]
    assert offsets.tolist() == [0, 2, 2, 2, 2, 2, 5, 5, 5]


def test_layout_sort_dispatches_to_the_op() -> None:
    groups = torch.randint(-1, 6, (2, 50, 2))
    routed = routed_layout(groups, 6)
    keys = torch.where(groups < 0, -1, groups + torch.arange(2).view(2, 1, 1) * 6).reshape(-1)
    ref_order, ref_offsets = _sort_ref(keys, 12)
    assert torch.equal(routed.segments.q_offsets, ref_offsets)
    assert torch.equal(routed.segments.q_index, torch.div(ref_order, 2, rounding_mode="floor"))


def test_sort_by_segment_bad_inputs() -> None:
    with pytest.raises(ValueError, match="keys must be < num_segments"):
        ops.sort_by_segment(torch.tensor([0, 3]), 3)
    with pytest.raises(TypeError, match="keys must be int64"):
        ops.sort_by_segment(torch.tensor([0, 1], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="keys must be 1-D"):
        ops.sort_by_segment(torch.zeros(2, 2, dtype=torch.int64), 3)
    with pytest.raises(ValueError, match="num_segments"):
        ops.sort_by_segment(torch.tensor([0]), -1)


# ---------------------------------------------------------------------------------------------------------------
# segment attention ops on explicit layouts
# ---------------------------------------------------------------------------------------------------------------


def _segment_attention_ref(q, k, v, layout: SegmentLayout, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Literal per-segment softmax attention in float64: out (Lq, Hq, D), lse (Hq, Lq). Differentiable."""
    Lq, Hq, D = layout.q_index.numel(), q.shape[1], q.shape[2]
    G = Hq // k.shape[1]
    q, k, v = q.double(), k.double().repeat_interleave(G, 1), v.double().repeat_interleave(G, 1)
    outs, lses = [], []
    qo, ko = layout.q_offsets.tolist(), layout.k_offsets.tolist()
    for s in range(len(qo) - 1):
        qs = q[layout.q_index[qo[s] : qo[s + 1]]]  # [n, Hq, D]
        ks, vs = k[layout.k_index[ko[s] : ko[s + 1]]], v[layout.k_index[ko[s] : ko[s + 1]]]  # [m, Hq, D]
        scores = torch.einsum("ihd,jhd->hij", qs, ks) * scale
        if ks.shape[0] == 0:
            outs.append(torch.zeros_like(qs))
            lses.append(torch.full((Hq, qs.shape[0]), -math.inf, dtype=torch.float64))
            continue
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(scores, -1), vs))
        lses.append(torch.logsumexp(scores, -1))
    tail = Lq - qo[-1]
    outs.append(torch.zeros(tail, Hq, D, dtype=torch.float64))
    lses.append(torch.full((Hq, tail), -math.inf, dtype=torch.float64))
    return torch.cat(outs), torch.cat(lses, 1)


def _layout(T: int, q_sizes, k_sizes, q_tail: int = 0, k_repeat: bool = False) -> SegmentLayout:
    """Segments of the given sizes over a random token order; q_tail unused positions after the last segment.

    k_repeat: keys are the segment's queries plus extra context rows drawn at random (tokens repeat)."""
    perm = torch.randperm(T)
    Lq = sum(q_sizes) + q_tail
    q_index = perm[:Lq]
    q_offsets = torch.tensor([0, *torch.tensor(q_sizes).cumsum(0).tolist()], dtype=torch.int64)
    if k_repeat:
        k_index = torch.randint(0, T, (sum(k_sizes),))
    else:
        k_index = perm[: sum(k_sizes)]
    k_offsets = torch.tensor([0, *torch.tensor(k_sizes).cumsum(0).tolist()], dtype=torch.int64)
    return SegmentLayout(q_index, q_offsets, k_index, k_offsets, T, q_unique=True, k_unique=not k_repeat)


LAYOUTS = {
    # ragged sizes, an empty segment, a singleton, sizes not multiples of any tile, unused tail positions
    "ragged": dict(T=700, q_sizes=[300, 0, 1, 129, 17], k_sizes=[300, 0, 1, 129, 17], q_tail=40),
    "one_segment": dict(T=333, q_sizes=[333], k_sizes=[333]),
    # keys differ from queries: extra context keys repeated across segments, a query segment with no keys
    "context_keys": dict(T=400, q_sizes=[100, 50, 7], k_sizes=[260, 0, 31], q_tail=3, k_repeat=True),
    # many balanced segments (with the test's single thread, the backward takes its one-pass path)
    "many_segments": dict(T=900, q_sizes=[150, 140, 0, 151, 130, 149], k_sizes=[150, 140, 5, 151, 130, 149], q_tail=7),
    "many_context": dict(T=900, q_sizes=[50, 40, 51, 30, 49], k_sizes=[90, 0, 91, 70, 89], q_tail=1, k_repeat=True),
}


@pytest.fixture
def one_thread():
    """The backward's path choice depends on the thread count: pin it so each layout takes a known path."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


GEMMS = [
    "blas",
    pytest.param("avx512", marks=pytest.mark.skipif(not cpu_backend.avx512_supported(), reason="CPU without AVX-512F")),
]


@pytest.fixture(params=GEMMS)
def gemm(request):
    """Run the test with each float32 GEMM of the cpu backend (the AVX-512 kernel and BLAS)."""
    with cpu_backend.gemm(request.param):
        assert cpu_backend.gemm_in_use() == request.param
        yield request.param


@pytest.mark.parametrize("name", list(LAYOUTS))
# D: full 64-column panels, a masked tail vector (40, 16), a second panel with a partial vector (72), many panels
@pytest.mark.parametrize("Hq, Hkv, D", [(2, 2, 64), (4, 1, 40), (6, 3, 16), (3, 1, 72), (1, 1, 256)])
def test_ops_match_reference_fp32(name: str, Hq: int, Hkv: int, D: int, one_thread, gemm) -> None:
    spec = LAYOUTS[name]
    layout = _layout(**spec)
    T, scale = spec["T"], D**-0.5 * 1.3
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    with _alloc.poisoned_outputs():
        _ops.sync_poison_outputs()
        out, lse = ops.segment_attention_fwd(
            q, k, v, layout.q_index, layout.q_offsets, layout.k_index, layout.k_offsets, scale
        )
        q64, k64, v64 = as_double_leaves(q, k, v)
        ref, ref_lse = _segment_attention_ref(q64, k64, v64, layout, scale)
        assert rel_err(out, ref) < TOL[torch.float32]
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert rel_err(lse[finite], ref_lse[finite]) < TOL[torch.float32]
        dout = torch.randn_like(out)
        grads = ops.segment_attention_bwd(
            dout, q, k, v, out, lse, layout.q_index, layout.q_offsets, layout.k_index, layout.k_offsets,
            scale, layout.q_unique, layout.k_unique,
        )  # fmt: skip
    _ops.sync_poison_outputs()
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    for g, r, n in zip(grads, ref_grads, "qkv", strict=True):
        assert not g.isnan().any(), f"d{n} has unwritten (NaN) elements"
        assert rel_err(g, r) < TOL[torch.float32], f"d{n}"
    assert not out.isnan().any() and not lse.isnan().any()


def test_ops_float64_match_reference_exactly() -> None:
    spec = LAYOUTS["ragged"]
    layout = _layout(**spec)
    q, k, v = as_double_leaves(*(torch.randn(spec["T"], 4, 32) for _ in range(3)))
    k, v = as_double_leaves(k[:, :2], v[:, :2])
    out = cpu_backend.segment_attention(q, k, v, layout, 0.2)
    ref, _ = _segment_attention_ref(q, k, v, layout, 0.2)
    dout = torch.randn_like(ref)
    assert rel_err(out, ref) < TOL[torch.float64]
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout), strict=True):
        assert rel_err(g, r) < TOL[torch.float64]


def _bad_args(**changes):
    T, D = 20, 8
    args = dict(
        q=torch.randn(T, 2, D),
        k=torch.randn(T, 1, D),
        v=torch.randn(T, 1, D),
        q_index=torch.arange(T),
        q_offsets=torch.tensor([0, 10, 20]),
        k_index=torch.arange(T),
        k_offsets=torch.tensor([0, 10, 20]),
        scale=0.5,
    )
    args.update(changes)
    return list(args.values())


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(q_index=torch.arange(20, dtype=torch.int32)), TypeError, "q_index must be int64"),
        (dict(k=torch.randn(20, 1, 8, dtype=torch.float64)), TypeError, "must share a dtype"),
        (dict(q=torch.randn(20, 2, 8).to(torch.int32)), TypeError, "q must be float16"),
        (dict(v=torch.randn(20, 2, 8)), ValueError, "k and v must have the same shape"),
        (dict(q=torch.randn(20, 3, 8), k=torch.randn(20, 2, 8), v=torch.randn(20, 2, 8)), ValueError, r"q heads \(3\)"),
        (dict(q=torch.randn(20, 2)), ValueError, "q must have shape"),
        (dict(q=torch.randn(20, 8, 2).transpose(1, 2)), ValueError, "q must have a contiguous last dimension"),
        (dict(q_offsets=torch.tensor([0, 12, 10])), ValueError, "q_offsets must be non-decreasing"),
        (dict(k_offsets=torch.tensor([1, 10, 20])), ValueError, r"k_offsets\[0\] must be 0"),
        (dict(k_offsets=torch.tensor([0, 10])), ValueError, "must both have S \\+ 1 entries"),
        (dict(q_offsets=torch.tensor([0, 10, 21]), k_offsets=torch.tensor([0, 10, 21])), ValueError, "exceeds"),
        (dict(k_index=torch.arange(20) + 1), ValueError, r"k_index\[19\] = 20 is not a token row"),
        (dict(scale=-1.0), ValueError, "scale must be a positive finite"),
    ],
)
def test_ops_reject_bad_inputs(changes, error, match) -> None:
    with pytest.raises(error, match=match):
        ops.segment_attention_fwd(*_bad_args(**changes))


def test_bwd_rejects_bad_lse() -> None:
    q, k, v, qi, qo, ki, ko, scale = _bad_args()
    out, lse = ops.segment_attention_fwd(q, k, v, qi, qo, ki, ko, scale)
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.segment_attention_bwd(out, q, k, v, out, lse.double(), qi, qo, ki, ko, scale, True, True)
    with pytest.raises(ValueError, match=r"lse must have shape \(Hq, Lq\)"):
        ops.segment_attention_bwd(out, q, k, v, out, lse.t(), qi, qo, ki, ko, scale, True, True)
    with pytest.raises(ValueError, match="dout must have shape"):
        ops.segment_attention_bwd(out[:5], q, k, v, out, lse, qi, qo, ki, ko, scale, True, True)


def test_fake_impls_match_real_shapes() -> None:
    layout = _layout(**LAYOUTS["context_keys"])
    q, k, v = torch.randn(400, 4, 16), torch.randn(400, 2, 16), torch.randn(400, 2, 16)
    args = (q, k, v, layout.q_index, layout.q_offsets, layout.k_index, layout.k_offsets, 0.25)
    out, lse = ops.segment_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, *args[3:], True, False)
    keys = torch.randint(-1, 5, (77,))
    for op, op_args in (
        (ops.segment_attention_fwd, args),
        (ops.segment_attention_bwd, bwd_args),
        (ops.sort_by_segment, (keys, 5)),
    ):
        torch.library.opcheck(op, op_args, test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_out, fake_lse = ops.segment_attention_fwd(
            *(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args)
        )
    assert fake_out.shape == out.shape and fake_out.dtype == out.dtype
    assert fake_lse.shape == lse.shape and fake_lse.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------------
# public API with backend="cpu"
# ---------------------------------------------------------------------------------------------------------------


def _group_ids(B: int, N: int, case: str) -> tuple[torch.Tensor, int]:
    if case == "ragged_padding_empty":  # ragged groups, padding tokens, groups 5 and 6 empty, group 7 singleton
        g = torch.randint(-1, 5, (B, N))
        g[:, 0] = 7
        return g, 8
    if case == "one_group":  # = dense attention
        return torch.zeros(B, N, dtype=torch.int64), 1
    raise ValueError(case)


@pytest.mark.parametrize("case", ["ragged_padding_empty", "one_group"])
@pytest.mark.parametrize("Hq, Hkv", [(4, 4), (4, 2), (8, 1)])
def test_group_attention_fp32(case: str, Hq: int, Hkv: int) -> None:
    B, N, D = 2, 301, 32
    q, k, v = qkv(B, N, Hq, Hkv, D)
    g, M = _group_ids(B, N, case)
    with _alloc.poisoned_outputs():
        out = moga.group_attention(q, k, v, g, num_groups=M, backend="cpu")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = as_double_leaves(q, k, v)
    ref = group_attention_ref(q64, k64, v64, g)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert rel_err(out, ref) < TOL[torch.float32]
    for gr, r in zip(grads, ref_grads, strict=True):
        assert not gr.isnan().any()
        assert rel_err(gr, r) < TOL[torch.float32]
    if case == "ragged_padding_empty":
        assert torch.all(out[g < 0] == 0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moga_attention_fp32_with_router_grads(top_k: int) -> None:
    B, N, Hq, Hkv, D, M = 2, 200, 4, 2, 64, 5
    q, k, v = qkv(B, N, Hq, Hkv, D)
    logits = torch.randn(B, N, M, requires_grad=True)
    with _alloc.poisoned_outputs():
        out = moga.moga_attention(q, k, v, logits, top_k=top_k, backend="cpu")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v, logits), dout)
    leaves = as_double_leaves(q, k, v, logits)
    ref = moga_attention_ref(*leaves, top_k=top_k)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    assert rel_err(out, ref) < TOL[torch.float32]
    for gr, r, n in zip(grads, ref_grads, ("q", "k", "v", "router_logits"), strict=True):
        assert not gr.isnan().any(), n
        assert rel_err(gr, r) < TOL[torch.float32], n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_2x_of_torch_backend(dtype: torch.dtype, gemm) -> None:
    """fp16/bf16 accumulate in fp32: errors at most 2x those of the (fp32-upcasting) torch backend."""
    B, N, Hq, Hkv, D, M = 1, 400, 4, 2, 64, 3
    q, k, v = qkv(B, N, Hq, Hkv, D, dtype=dtype)
    logits = torch.randn(B, N, M)
    leaves = as_double_leaves(q, k, v)
    ref = moga_attention_ref(*leaves, logits.double(), top_k=2)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, dout)
    errors = {}
    for backend in ("cpu", "torch"):
        with _alloc.poisoned_outputs():
            out = moga.moga_attention(q, k, v, logits, top_k=2, backend=backend)
            grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
        assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
        errors[backend] = [rel_err(out, ref)] + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]
    for name, cpu_err, torch_err in zip(("out", "dq", "dk", "dv"), errors["cpu"], errors["torch"], strict=True):
        assert cpu_err <= 2 * torch_err, f"{name}: cpu {cpu_err:.2e} vs torch {torch_err:.2e}"
        assert cpu_err < (1e-2 if dtype == torch.bfloat16 else 2e-3), name


def test_gemm_choice() -> None:
    """set_gemm / gemm / gemm_in_use: validation, restore on exit, and the two GEMMs agree to fp32 rounding."""
    with pytest.raises(ValueError, match="cpu gemm must be one of"):
        cpu_backend.set_gemm("mkl")
    with pytest.raises(ValueError, match="cpu gemm must be"):
        _ops._C._set_cpu_gemm("fast")
    if not cpu_backend.avx512_supported():
        with pytest.raises(ValueError, match="needs a CPU with AVX-512F"):
            cpu_backend.set_gemm("avx512")
    before = cpu_backend.gemm_in_use()
    q, k, v = qkv(1, 500, 4, 2, 64, requires_grad=False)
    g = torch.randint(0, 3, (1, 500))
    outs = {}
    for name in ("blas", "avx512"):
        if name == "avx512" and not cpu_backend.avx512_supported():
            continue
        with cpu_backend.gemm(name):
            assert cpu_backend.gemm_in_use() == name
            outs[name] = moga.group_attention(q, k, v, g, num_groups=3, backend="cpu")
        assert cpu_backend.gemm_in_use() == before
    if len(outs) == 2:
        assert rel_err(outs["avx512"], outs["blas"].double()) < 1e-6


@pytest.mark.parametrize("value, expect", [("blas", "blas"), ("Auto", None), ("nope", "ValueError")])
def test_gemm_from_environment(value: str, expect: str | None) -> None:
    proc = run_python("from moga.backends import cpu_backend; print(cpu_backend.gemm_in_use())", MOGA_CPU_GEMM=value)
    if expect == "ValueError":
        assert proc.returncode != 0 and "cpu gemm must be one of" in proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        with cpu_backend.gemm("auto"):
            assert proc.stdout.strip() == (expect or cpu_backend.gemm_in_use())


def test_cpu_backend_selection() -> None:
    assert "cpu" in moga.available_backends()
    probe = torch.zeros(4, 2, 8)
    assert cpu_backend.unsupported_reason(probe, probe, probe) is None
    assert "dtype" in cpu_backend.unsupported_reason(probe.int(), probe.int(), probe.int())
    assert "meta" in cpu_backend.unsupported_reason(probe.to("meta"), probe, probe)
    assert torch_backend.unsupported_reason(probe, probe, probe) is None


def test_torch_compile_group_attention() -> None:
    B, N, H, D, M = 1, 64, 2, 16, 3
    q, k, v = qkv(B, N, H, H, D, requires_grad=False)
    g = torch.randint(0, M, (B, N))

    def fn(q, k, v, g):
        return moga.group_attention(q, k, v, g, num_groups=M, backend="cpu") * 2

    compiled = torch.compile(fn, fullgraph=False, backend="aot_eager")
    out = compiled(q, k, v, g)
    ref = group_attention_ref(q, k, v, g) * 2
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("api", ["group_attention", "moga_attention", "window_attention"])
def test_torch_compile_fullgraph_forward_and_backward(api: str) -> None:
    """Each public function traces as one graph (fullgraph=True), forward and backward, and matches eager."""
    B, N, Hq, Hkv, D, M = 1, 48, 4, 2, 16, 3
    q, k, v = qkv(B, N, Hq, Hkv, D)
    logits = torch.randn(B, N, M, requires_grad=True)
    g = torch.randint(-1, M, (B, N))
    calls = {
        "group_attention": lambda q, k, v, lg: moga.group_attention(q, k, v, g, num_groups=M, backend="cpu"),
        "moga_attention": lambda q, k, v, lg: moga.moga_attention(q, k, v, lg, top_k=2, backend="cpu"),
        "window_attention": lambda q, k, v, lg: moga.window_attention(q, k, v, grid=(3, 4, 4), window=(2, 2, 3)),
    }
    fn = calls[api]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [q, k, v, logits]
    dout = torch.randn(B, N, Hq, D)
    results = []
    for f in (fn, compiled):
        out = f(*leaves)
        grads = torch.autograd.grad(out, leaves, dout, allow_unused=True)
        results.append([out, *grads])
    for got, want in zip(results[1], results[0], strict=True):
        assert (got is None) == (want is None)
        if want is not None:
            assert rel_err(got, want.double()) < 1e-6


def test_torch_compile_checks_group_ids_in_the_graph() -> None:
    """Under torch.compile the num_groups range check is an assertion op (no host read, no graph break)."""
    q, k, v = qkv(1, 16, 2, 2, 16, requires_grad=False)
    g = torch.randint(0, 3, (1, 16))
    compiled = torch.compile(
        lambda g: moga.group_attention(q, k, v, g, num_groups=3, backend="cpu"), fullgraph=True, backend="aot_eager"
    )
    compiled(g)
    g[0, 5] = 3
    with pytest.raises(RuntimeError, match="group_ids must be < num_groups"):
        compiled(g)


@pytest.mark.parametrize("name", ["context_keys", "many_context"])
def test_bwd_through_positions_matches_op_backward(name: str) -> None:
    """The deterministic backward for repeated tokens (used on CUDA, where the kernels sum repeated tokens with
    float atomics) gives the op's gradients; run here through the CPU op and the Triton reduction."""
    from moga.backends._compiled import bwd, bwd_through_positions

    spec = LAYOUTS[name]
    layout = _layout(**spec)
    T, scale = spec["T"], 0.2
    q, k, v = torch.randn(T, 4, 32), torch.randn(T, 2, 32), torch.randn(T, 2, 32)
    args = (q, k, v, layout.q_index, layout.q_offsets, layout.k_index, layout.k_offsets, scale)
    out, lse = ops.segment_attention_fwd(*args)
    dout = torch.randn_like(out)
    want = bwd(dout, q, k, v, out, lse, layout, scale)
    with _alloc.poisoned_outputs():
        got = bwd_through_positions(dout, q, k, v, out, lse, layout, scale)
    for g, w, n in zip(got, want, "qkv", strict=True):
        assert torch.isfinite(g).all(), f"d{n} has unwritten elements"
        assert rel_err(g, w) < 1e-6, f"d{n}"
