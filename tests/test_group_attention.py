"""moga.group_attention against the dense float64 reference, on every CPU-runnable backend."""

from __future__ import annotations

import pytest
import torch

import moga
from moga._alloc import poisoned_outputs
from moga.reference import group_attention_ref
from tests.utils import (
    assert_bf16_fwd_bwd_within_twice,
    bf16_masked_attention,
    check_fwd_bwd_against_float64,
    cpu_backends,
    dense_sdpa,
    qkv,
    rel_err,
)

BACKENDS = cpu_backends()


def _check_fwd_bwd(backend, q, k, v, group_ids, num_groups=None, tol=None):
    """Forward and dq/dk/dv against the float64 reference, with poisoned kernel outputs."""
    return check_fwd_bwd_against_float64(
        lambda q, k, v: moga.group_attention(q, k, v, group_ids, num_groups=num_groups, backend=backend),
        lambda q64, k64, v64: group_attention_ref(q64, k64, v64, group_ids),
        q,
        k,
        v,
        tol,
    )


def _ragged_ids(B, N, G):
    return torch.randint(0, G, (B, N))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,Hq,Hkv,D", [(1, 37, 2, 2, 32), (2, 130, 4, 2, 64), (1, 67, 4, 1, 32)])
def test_ragged_groups(backend, B, N, Hq, Hkv, D):
    q, k, v = qkv(B, N, Hq, Hkv, D)
    _check_fwd_bwd(backend, q, k, v, _ragged_ids(B, N, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_groups_with_num_groups(backend):
    q, k, v = qkv(2, 50, 2, 2, 32)
    ids = torch.tensor([0, 3, 7])[torch.randint(0, 3, (2, 50))]  # groups 1, 2, 4, 5, 6 empty
    _check_fwd_bwd(backend, q, k, v, ids, num_groups=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_singleton_groups_output_equals_v(backend):
    q, k, v = qkv(1, 40, 4, 2, 32)
    ids = torch.randperm(40).view(1, 40)
    out = _check_fwd_bwd(backend, q, k, v, ids)
    torch.testing.assert_close(out, v.detach().repeat_interleave(2, dim=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_group_equals_sdpa(backend):
    q, k, v = qkv(2, 70, 2, 2, 64)
    ids = torch.full((2, 70), 3)
    out = _check_fwd_bwd(backend, q, k, v, ids)
    dense = dense_sdpa(q, k, v)
    assert rel_err(out, dense) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_ids(backend):
    q, k, v = qkv(2, 60, 2, 1, 32)
    ids = torch.randint(-1, 3, (2, 60))
    ids[0, :5] = -7  # any negative id is padding
    out = _check_fwd_bwd(backend, q, k, v, ids)
    pad = ids < 0
    assert (out[pad] == 0).all()
    assert (q.grad[pad] == 0).all() and (k.grad[pad] == 0).all() and (v.grad[pad] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding(backend):
    q, k, v = qkv(1, 20, 2, 2, 32)
    with poisoned_outputs():
        out = moga.group_attention(q, k, v, torch.full((1, 20), -1), backend=backend)
    assert (out == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_huge_unsorted_ids(backend):
    q, k, v = qkv(2, 45, 2, 2, 32)
    base = torch.randint(0, 4, (2, 45))
    ids = torch.tensor([2**62, 5, 10**12, 77])[base]
    out = _check_fwd_bwd(backend, q, k, v, ids)
    # relabelling the groups must not change anything
    same = moga.group_attention(q.detach(), k.detach(), v.detach(), base.int(), backend=backend)
    torch.testing.assert_close(out.detach(), same, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16(backend):
    q, k, v = qkv(1, 96, 2, 2, 64, dtype=torch.float16)
    _check_fwd_bwd(backend, q, k, v, _ragged_ids(1, 96, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_within_twice_torch_bf16_error(backend):
    """Output and dq/dk/dv errors vs float64 at most twice those of masked attention computed in bf16."""
    q, k, v = qkv(1, 80, 2, 2, 64, dtype=torch.bfloat16)
    ids = _ragged_ids(1, 80, 3)
    assert_bf16_fwd_bwd_within_twice(
        lambda q, k, v: moga.group_attention(q, k, v, ids, backend=backend),
        lambda q, k, v: bf16_masked_attention(q, k, v, ids[:, None, :, None] == ids[:, None, None, :]),
        lambda q64, k64, v64: group_attention_ref(q64, k64, v64, ids),
        q,
        k,
        v,
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_and_int32_ids(backend):
    q, k, v = qkv(1, 33, 2, 2, 32, requires_grad=False)
    ids = torch.randint(0, 3, (1, 33), dtype=torch.int32)
    out = moga.group_attention(q, k, v, ids, softmax_scale=0.3, backend=backend)
    assert rel_err(out, group_attention_ref(q, k, v, ids, softmax_scale=0.3)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    qkv_fused = torch.randn(2, 41, 3, 2, 32)  # slices of a fused projection
    q, k, v = qkv_fused[:, :, 0], qkv_fused[:, :, 1], qkv_fused[:, :, 2]
    assert not q.is_contiguous()
    ids = _ragged_ids(2, 41, 4)
    out = moga.group_attention(q, k, v, ids, backend=backend)
    assert rel_err(out, group_attention_ref(q, k, v, ids)) < 1e-5


def test_empty_sequence_and_batch():
    for B, N in ((0, 5), (2, 0)):
        q, k, v = qkv(B, N, 2, 2, 32, requires_grad=False)
        out = moga.group_attention(q, k, v, torch.zeros(B, N, dtype=torch.long), backend="torch")
        assert out.shape == q.shape
