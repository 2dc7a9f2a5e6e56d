"""GPU backends on tensors of more than 2^31 elements (int64 indexing), through the public API.

q, k, v: (1, T, 1, 128) bf16 with T = 2^24 + 4096 tokens, i.e. 2^31 + 2^19 elements each (4.3 GB). Only the last
4096 tokens belong to groups (ragged sizes, a singleton, an empty group, padding tokens among them): every row they
read starts at element offset >= 2^31, where a 32-bit row * stride product wraps. Their outputs and gradients are
checked against a float64 reference computed on that slice alone (bf16: at most twice the error of the bf16 PyTorch
implementation, the torch backend, on the same slice); every other token's output and gradients must be exactly zero,
and nothing may stay NaN (kernel outputs are NaN-poisoned). Needs ~80 GB free on the device (an H200 has 141); it is
skipped without CUDA. bench/gpu_check.sh runs this file in a process of its own, under a time cap.
"""

from __future__ import annotations

import pytest
import torch

import moga
from moga._alloc import poisoned_outputs
from moga.backends import get_backend
from moga.reference import group_attention_ref
from tests.utils import rel_err

TAIL = 4096
T = (1 << 24) + TAIL
D = 128
NUM_GROUPS = 5
# Group sizes among the last TAIL tokens (id -1: padding); group 3 stays empty.
TAIL_SIZES = {0: 1900, 1: 1, 2: 1500, 4: 595, -1: 100}
BACKENDS = ("triton", "triton_tma", "varlen", "cuda")  # GPU kernels (cuda last: an illegal address poisons the rest)
TENSORS_NEEDED = 18  # q, k, v, dout, outputs, gradients, a backend's permuted copies: in units of one q's bytes

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _skip_reason(backend: str) -> str | None:
    if backend not in moga.available_backends():
        return f"backend {backend!r} not available in this installation"
    probe = torch.empty(1, 1, D, device="cuda", dtype=torch.bfloat16)
    reason = get_backend(backend).unsupported_reason(probe, probe, probe)
    if reason is not None:
        return f"backend {backend!r}: {reason}"
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    need = TENSORS_NEEDED * T * D * 2
    if free < need:
        return f"needs ~{need / 2**30:.0f} GiB free on the device, {free / 2**30:.0f} GiB are"
    return None


def _tail_ids(gen: torch.Generator) -> torch.Tensor:
    assert sum(TAIL_SIZES.values()) == TAIL
    ids = torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in TAIL_SIZES.items()])
    return ids[torch.randperm(TAIL, generator=gen)]


def _problems(backend: str) -> list[str]:
    """Run forward and backward past 2^31 elements and list what is wrong (empty: all correct). The checks are
    collected, not asserted, so that a failure does not keep ~50 GB of tensors alive in its traceback for the next
    backend's test."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(1, T, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4))
    assert q.numel() > 2**31
    ids = torch.full((1, T), -1, dtype=torch.int64, device="cuda")
    ids[0, -TAIL:] = _tail_ids(torch.Generator().manual_seed(1)).cuda()
    for t in (q, k, v):
        t.requires_grad_(True)

    with poisoned_outputs():
        out = moga.group_attention(q, k, v, ids, num_groups=NUM_GROUPS, backend=backend)
        out.backward(dout)
    torch.cuda.synchronize()

    tail = slice(T - TAIL, T)
    tail_ids = ids[:, tail]
    q64, k64, v64 = (t.detach()[:, tail].double().requires_grad_(True) for t in (q, k, v))
    ref = group_attention_ref(q64, k64, v64, tail_ids)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout[:, tail].double())
    # The bar for bf16: PyTorch's own bf16 implementation (the torch backend) on the same slice.
    qb, kb, vb = (t.detach()[:, tail].clone().requires_grad_(True) for t in (q, k, v))
    base = moga.group_attention(qb, kb, vb, tail_ids, num_groups=NUM_GROUPS, backend="torch")
    base_grads = torch.autograd.grad(base, (qb, kb, vb), dout[:, tail])

    problems = []
    checks = [("out", out.detach(), ref, base)]
    checks += list(zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), ref_grads, base_grads, strict=True))
    for name, got, want, bf16 in checks:
        if got is None or got.shape != (1, T, 1, D) or got.dtype != torch.bfloat16:
            problems.append(f"{name}: {None if got is None else (tuple(got.shape), got.dtype)}")
            continue
        if got.isnan().any():
            problems.append(f"{name}: unwritten (NaN) elements")
        if torch.count_nonzero(got[:, : T - TAIL]):
            problems.append(f"{name}: tokens of no group must be exactly zero")
        if torch.count_nonzero(got[:, tail][tail_ids < 0]):
            problems.append(f"{name}: padding tokens must be exactly zero")
        err, bf16_err = rel_err(got[:, tail], want), rel_err(bf16, want)
        if not err <= 2 * bf16_err:
            problems.append(f"{name}: rel err {err:.3e} > 2 x bf16 PyTorch's {bf16_err:.3e}")
    return problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_attention_past_2_31_elements(backend: str) -> None:
    reason = _skip_reason(backend)
    if reason:
        pytest.skip(reason)
    problems = _problems(backend)
    torch.cuda.empty_cache()
    assert not problems, f"{backend}: " + "; ".join(problems)
