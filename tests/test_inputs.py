"""Inputs users really pass: strided views, empty batches, odd id dtypes, partial requires_grad, autocast,
mixed devices. Each must give the reference answer or a clear ValueError/TypeError, never a crash."""

from __future__ import annotations

import pytest
import torch

import moga
from moga._alloc import poisoned_outputs
from moga.reference import group_attention_ref, moga_attention_ref
from tests.utils import TOL, cpu_backends, rel_err

BACKENDS = cpu_backends()
B, N, H, D = 2, 37, 2, 32


def _check_group(backend, q, k, v, ids, **kw):
    """Forward and gradients of whichever of q, k, v require grad, against the float64 reference."""
    leaves = [t for t in (q, k, v) if t.requires_grad]
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    ref = group_attention_ref(*ref_in, ids)
    dout = torch.randn_like(ref)
    with poisoned_outputs():
        out = moga.group_attention(q, k, v, ids, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < TOL[q.dtype]
    if leaves:
        ref.backward(dout)
        grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
        want = [r.grad for r, t in zip(ref_in, (q, k, v), strict=True) if t.requires_grad]
        for got, w in zip(grads, want, strict=True):
            assert torch.isfinite(got).all()
            assert rel_err(got, w) < TOL[q.dtype]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_qkv_projection_slices(backend):
    """q, k, v as slices of one (B, N, 3 * H * D) projection: strided in batch, seqlen and heads."""
    x = torch.randn(B, N, 3 * H * D, requires_grad=True)
    q, k, v = x.view(B, N, 3, H, D).unbind(2)
    assert not q.is_contiguous()
    _check_group(backend, q, k, v, torch.randint(0, 4, (B, N)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_gqa_projection_slices(backend):
    Hkv = 1
    x = torch.randn(B, N, (H + 2 * Hkv) * D)
    # detach() keeps the strides: leaves for autograd that still view x's storage
    parts = x.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, D)).detach().requires_grad_(True) for t in parts)
    assert not k.is_contiguous() and k.stride(1) == (H + 2 * Hkv) * D
    _check_group(backend, q, k, v, torch.randint(0, 3, (B, N)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_heads_first_transposed_views(backend):
    """(B, H, N, D) tensors passed as .transpose(1, 2), the layout most attention modules hold."""
    q, k, v = (torch.randn(B, H, N, D).transpose(1, 2).requires_grad_(True) for _ in range(3))
    assert q.stride(1) == D
    _check_group(backend, q, k, v, torch.randint(0, 3, (B, N)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_last_dim_and_broadcast_kv(backend):
    """Every other element of a wider tensor (last-dim stride 2) and k/v broadcast over heads (stride 0)."""
    q = torch.randn(B, N, H, 2 * D)[..., ::2]
    k = torch.randn(B, N, 1, D).expand(B, N, H, D)
    v = torch.randn(B, N, 1, D).expand(B, N, H, D)
    _check_group(backend, q, k, v, torch.randint(0, 3, (B, N)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 8), (2, 0), (0, 0)])
def test_empty_batch_or_sequence(backend, shape):
    b, n = shape
    q, k, v = (torch.randn(b, n, H, D, requires_grad=True) for _ in range(3))
    logits = torch.randn(b, n, 4, requires_grad=True)
    for out in (
        moga.group_attention(q, k, v, torch.zeros(b, n, dtype=torch.long), backend=backend),
        moga.group_attention(q, k, v, torch.zeros(b, n, dtype=torch.long), num_groups=3, backend=backend),
        moga.moga_attention(q, k, v, logits, top_k=2, backend=backend),
    ):
        assert out.shape == (b, n, H, D) and out.dtype == q.dtype
        out.sum().backward()  # must not fail: gradients of empty tensors are empty
    assert q.grad.shape == q.shape and logits.grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_gives_zero_output_and_grads(backend):
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    out = moga.group_attention(q, k, v, torch.full((B, N), -1), backend=backend)
    assert (out == 0).all()
    out.sum().backward()
    assert all((t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8])
def test_group_id_dtypes(backend, dtype):
    ids = torch.randint(0, 4, (B, N))
    if dtype.is_signed:
        ids[0, :3] = -1  # padding
    ids = ids.to(dtype)
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    _check_group(backend, q, k, v, ids)
    _check_group(backend, q, k, v, ids, num_groups=4)
    if dtype == torch.uint8:  # the largest uint8 id is an ordinary group, not padding
        _check_group(backend, q, k, v, torch.where(ids == 3, 255, ids).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_group_ids(backend):
    """Ids near 2^62 are compacted exactly (no float round-trip, no overflow in batch * num_groups)."""
    ids = torch.tensor([2**62, 2**62 + 1, 5, -3])[torch.randint(0, 4, (B, N))]
    q, k, v = (torch.randn(B, N, H, D, requires_grad=True) for _ in range(3))
    _check_group(backend, q, k, v, ids)
    with pytest.raises(ValueError, match="num_groups"):
        moga.group_attention(q, k, v, ids, num_groups=10, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_groups_past_n_gives_the_same_result_as_dense_ids(backend):
    """Ids are labels: with num_groups far above N (compacted per row on the device) or with more distinct ids
    in the batch than tokens in a row (num_groups=None), output and gradients equal those of the same partition
    given as small dense ids, bit for bit, and match the float64 reference. (N = 14: past N the layout has one
    segment per token, which the Triton interpreter pays for.)"""
    n = 14
    small = torch.randint(-1, 6, (B, n))
    small[1] = torch.arange(n) % 7 - 1  # row 1: every group, one padding token in seven
    labels = torch.tensor([2**62, 10**12, 3, 2**40 + 5, 999_999_999, 17])  # group g -> a large label
    relabelled = torch.where(small < 0, small, labels[small.clamp(min=0)])
    relabelled[1] += (small[1] >= 0).long()  # row 1 uses other labels than row 0: 12 distinct ids in the batch
    q, k, v = (torch.randn(B, n, H, D, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, n, H, D)

    def run(ids, num_groups):
        out = moga.group_attention(q, k, v, ids, num_groups=num_groups, backend=backend)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    want = run(small, 6)
    cases = [(small, 10**9), (relabelled, 2**63), (relabelled, None)]
    if backend == "triton":  # the relabelling is backend-independent; the interpreter checks one case (time)
        cases = cases[1:2]
    for ids, num_groups in cases:
        for got, w in zip(run(ids, num_groups), want, strict=True):
            torch.testing.assert_close(got, w, rtol=0, atol=0)
    if backend != "triton":
        _check_group(backend, q, k, v, relabelled, num_groups=2**62 + 2)


def test_compacted_ids_keep_each_rows_partition():
    from moga.functional import _dense_group_ids

    ids = torch.tensor([[5, 10**15, 5, -1, 7, 10**15], [-2, -2, 0, 0, 0, 3]])
    dense, G = _dense_group_ids(ids, 10**15 + 1)
    assert G == ids.shape[1] and dense.dtype == torch.int64
    assert ((dense >= 0) & (dense < G) | (dense == -1)).all()
    for row_ids, row_dense in zip(ids, dense, strict=True):
        same = row_ids[:, None] == row_ids[None, :]
        assert torch.equal(row_dense[:, None] == row_dense[None, :], same)  # same partition
        assert torch.equal(row_dense < 0, row_ids < 0)  # padding stays padding


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_ids_and_logits(backend):
    ids = torch.randint(0, 3, (N, B)).t()  # (B, N) transposed view
    logits = torch.randn(B, 4, N).transpose(1, 2)  # (B, N, M) from a (B, M, N) router output
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    assert rel_err(moga.group_attention(q, k, v, ids, backend=backend), group_attention_ref(q, k, v, ids)) < 1e-5
    out = moga.moga_attention(q, k, v, logits, top_k=2, backend=backend)
    assert rel_err(out, moga_attention_ref(q, k, v, logits, top_k=2)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs_grad", ["q", "kv", "v", "logits"])
def test_requires_grad_on_some_inputs(backend, needs_grad):
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    logits = torch.randn(B, N, 4)
    named = {"q": q, "k": k, "v": v, "logits": logits}
    for name in named:
        named[name].requires_grad_(name in needs_grad if name != "logits" else needs_grad == "logits")
    ref_in = {n: t.detach().double().requires_grad_(t.requires_grad) for n, t in named.items()}
    ref = moga_attention_ref(ref_in["q"], ref_in["k"], ref_in["v"], ref_in["logits"], top_k=2)
    dout = torch.randn_like(ref)
    ref.backward(dout)
    out = moga.moga_attention(q, k, v, logits, top_k=2, backend=backend)
    out.backward(dout.float())
    for name, t in named.items():
        if t.requires_grad:
            assert t.grad is not None and rel_err(t.grad, ref_in[name].grad) < 1e-5, name
        else:
            assert t.grad is None, f"{name} does not require grad but got one"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_inputs_give_output_without_graph(backend):
    q, k, v = (torch.randn(B, N, H, D) for _ in range(3))
    out = moga.moga_attention(q, k, v, torch.randn(B, N, 3), backend=backend)
    assert not out.requires_grad
    with torch.no_grad():
        q.requires_grad_(True)
        assert not moga.group_attention(q, k, v, torch.zeros(B, N, dtype=torch.long), backend=backend).requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_autocast_bf16(backend, dtype):
    """Inside a bf16 autocast region the result keeps q's dtype and the accuracy of q's dtype."""
    q, k, v = (torch.randn(B, N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    logits = torch.randn(B, N, 4, dtype=dtype, requires_grad=True)
    ref = moga_attention_ref(q.detach(), k.detach(), v.detach(), logits.detach(), top_k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moga.moga_attention(q, k, v, logits, top_k=2, backend=backend)
    assert out.dtype == q.dtype
    # float32 inputs stay float32-accurate (nothing runs in bf16); bf16 inputs (8 mantissa bits) land within a
    # few 1e-3 of the reference.
    assert rel_err(out, ref) < (TOL[torch.float32] if dtype == torch.float32 else 1e-2)
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v, logits))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_does_not_change_the_result(backend, dtype):
    """Every backend computes in the inputs' dtype inside an autocast region too (the kernel backends' custom ops
    are not autocast; the torch backend and the gated sum switch it off), so autocast and the choice of backend
    never change the numerics: output and gradients are bitwise those of the same call without autocast."""
    q, k, v = (torch.randn(B, N, H, D, dtype=dtype, requires_grad=True) for _ in range(3))
    logits = torch.randn(B, N, 4, dtype=dtype, requires_grad=True)
    dout = torch.randn(B, N, H, D, dtype=dtype)
    results = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = moga.moga_attention(q, k, v, logits, top_k=2, backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, k, v, logits), dout)])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_mixed_devices_are_clear_errors():
    q, k, v = (torch.randn(1, 8, 2, 32) for _ in range(3))
    meta = q.to("meta")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="one device"):
        moga.group_attention(q, meta, v, ids)
    with pytest.raises(ValueError, match="one device"):
        moga.moga_attention(q, k, meta, torch.randn(1, 8, 3))
    with pytest.raises(ValueError, match="group_ids is on meta but q is on cpu"):
        moga.group_attention(q, k, v, ids.to("meta"))
    with pytest.raises(ValueError, match="router_logits is on meta but q is on cpu"):
        moga.moga_attention(q, k, v, torch.randn(1, 8, 3, device="meta"))


def test_python_scalars_and_lists_are_type_errors():
    q, k, v = (torch.randn(1, 8, 2, 32) for _ in range(3))
    with pytest.raises(TypeError, match="group_ids must be a torch.Tensor"):
        moga.group_attention(q, k, v, [[0] * 8])
    with pytest.raises(TypeError, match="router_logits must be a torch.Tensor"):
        moga.moga_attention(q, k, v, [[[0.0, 1.0]] * 8])
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        moga.group_attention(q.numpy(), k, v, torch.zeros(1, 8, dtype=torch.long))


def test_all_meta_inputs_raise_clear_error():
    q, k, v = (torch.empty(1, 8, 2, 32, device="meta") for _ in range(3))
    with pytest.raises(ValueError, match="meta"):
        moga.moga_attention(q, k, v, torch.empty(1, 8, 3, device="meta"))
    with pytest.raises(ValueError, match="meta"):
        moga.group_attention(q, k, v, torch.zeros(1, 8, dtype=torch.long, device="meta"), num_groups=2)
