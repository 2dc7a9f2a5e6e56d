"""Correctness check run before any timing: moga against the dense float64 reference.

A small ragged case (an empty group, a singleton group, N not a multiple of any block size, GQA) in the
benchmark's dtype on the benchmark's device, through every backend that can run it: ``group_attention`` and
``moga_attention`` (top_k 1 and 2), outputs and gradients, with outputs and gradients allocated poisoned
(NaN) so an unwritten element fails the check. Bounds follow the project's standard: fp32 1e-5, fp16 1e-3,
bf16 twice the error of the same computation done by PyTorch in bf16 (dense masked SDPA).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import moga
from moga._alloc import poisoned_outputs
from moga.backends import get_backend
from moga.reference import group_attention_ref, moga_attention_ref

CHECK_SIZES = [150, 100, 49, 1, 0]  # ragged, one singleton, one empty group; N = 300
FIXED_BOUND = {torch.float32: 1e-5, torch.float16: 1e-3, torch.float64: 1e-10}


@dataclass
class CheckResult:
    path: str  # e.g. "group_attention[torch]"
    tensor: str  # "out", "dq", ...
    rel_err: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.bound  # NaN compares False: an unwritten element fails

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def runnable_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict[str, str | None]:
    """Every available backend -> None if it can run these (B, N, H, D) inputs, else the reason it cannot."""
    qf, kf, vf = (t.reshape(-1, t.shape[2], t.shape[3]) for t in (q, k, v))
    reasons = {}
    for name in moga.available_backends():
        reasons[name] = get_backend(name).unsupported_reason(qf, kf, vf)
    return reasons


def _grads(out: torch.Tensor, dout: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, leaves, dout))


def _torch_lowp_errors(q, k, v, ids, dout, ref_out, ref_grads) -> list[float]:
    """Errors of dense masked SDPA computed by PyTorch in the inputs' own dtype (the bf16 yardstick)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    rep = q.shape[2] // k.shape[2]
    mask = (ids[:, :, None] == ids[:, None, :])[:, None]  # (B, 1, N, N)
    ql, kl, vl = (t.transpose(1, 2) for t in leaves)
    kl, vl = kl.repeat_interleave(rep, 1), vl.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(ql, kl, vl, attn_mask=mask).transpose(1, 2)
    grads = _grads(out, dout, leaves)
    return [rel_err(out, ref_out)] + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)]


def _bounds(dtype: torch.dtype, lowp_errors: list[float]) -> list[float]:
    if dtype in FIXED_BOUND:
        return [FIXED_BOUND[dtype]] * len(lowp_errors)
    return [2.0 * e for e in lowp_errors]


def run_check(device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[CheckResult]:
    """Check every runnable backend on a small case; returns one result per (path, tensor)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = CHECK_SIZES
    M, N, Hq, Hkv, D = len(sizes), sum(sizes), 4, 2, 64
    ids = torch.repeat_interleave(torch.arange(M), torch.tensor(sizes))[torch.randperm(N, generator=gen)]
    ids = ids.view(1, N)
    q = torch.randn(1, N, Hq, D, generator=gen)
    k, v = (torch.randn(1, N, Hkv, D, generator=gen) for _ in range(2))
    logits = torch.randn(1, N, M, generator=gen)
    dout = torch.randn(1, N, Hq, D, generator=gen)
    q, k, v, dout = (t.to(device=device, dtype=dtype) for t in (q, k, v, dout))
    ids, logits = ids.to(device), logits.to(device)

    # float64 references with gradients.
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_ga = group_attention_ref(*leaves64, ids)
    ref_ga_grads = _grads(ref_ga, dout.double(), leaves64)
    ga_bounds = _bounds(dtype, _torch_lowp_errors(q, k, v, ids, dout, ref_ga, ref_ga_grads))

    results: list[CheckResult] = []
    names = ["out", "dq", "dk", "dv"]
    for backend, reason in runnable_backends(q, k, v).items():
        if reason is not None:
            continue
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        with poisoned_outputs():
            out = moga.group_attention(*leaves, ids, num_groups=M, backend=backend)
            grads = _grads(out, dout, leaves)
        for name, got, ref, bound in zip(names, [out, *grads], [ref_ga, *ref_ga_grads], ga_bounds, strict=True):
            results.append(CheckResult(f"group_attention[{backend}]", name, rel_err(got, ref), bound))

    for top_k in (1, 2):
        leaves64_l = [*[t.detach().double().requires_grad_(True) for t in (q, k, v)], logits.double().requires_grad_()]
        ref = moga_attention_ref(*leaves64_l[:3], leaves64_l[3], top_k=top_k)
        ref_grads = _grads(ref, dout.double(), leaves64_l)
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, logits)]
        with poisoned_outputs():
            out = moga.moga_attention(*leaves[:3], leaves[3], top_k=top_k)
            grads = _grads(out, dout, leaves)
        # moga_attention's bounds: the group_attention yardstick (the gate adds one fp32 multiply).
        bounds = [*ga_bounds, ga_bounds[0] if dtype not in FIXED_BOUND else max(ga_bounds[0], 1e-5)]
        for name, got, r, bound in zip([*names, "dlogits"], [out, *grads], [ref, *ref_grads], bounds, strict=True):
            results.append(CheckResult(f"moga_attention[auto,top_k={top_k}]", name, rel_err(got, r), bound))
    return results


def format_check(results: list[CheckResult]) -> str:
    lines = [f"{'path':<34} {'tensor':<8} {'rel err':>10} {'bound':>10}  ok"]
    for r in results:
        lines.append(f"{r.path:<34} {r.tensor:<8} {r.rel_err:>10.2e} {r.bound:>10.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
