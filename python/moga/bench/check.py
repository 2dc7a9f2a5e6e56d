"""Correctness check run before any timing: moga against the dense float64 reference.

A small ragged case (an empty group, a singleton group, N not a multiple of any block size, GQA) in the
benchmark's dtype on the benchmark's device, through every backend that can run it: ``group_attention`` and
``moga_attention`` (top_k 1 and 2), outputs and gradients, with outputs and gradients allocated poisoned
(NaN) so an unwritten element fails the check. Bounds follow the project's standard: fp32 1e-5, fp16 1e-3,
bf16 twice the error of the same computation done by PyTorch in bf16 (dense masked SDPA).

Each path is checked on its own: an exception in one path is recorded as that path's result (tensor ``"error"``,
the exception in ``error``) and the other paths are still checked. :func:`failed_methods` maps the failures to
the bench methods whose timings must be dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    path: str  # e.g. "group_attention[torch]", "moga_attention[auto,top_k=1]"
    tensor: str  # "out", "dq", ...; "error" when the path raised
    rel_err: float
    bound: float
    error: str | None = None  # "ExceptionType: first line of the message" when the path raised

    @property
    def ok(self) -> bool:
        # NaN compares False: an unwritten element fails.
        return self.error is None and self.rel_err <= self.bound

    @property
    def method(self) -> str:
        """The bench method this path checks: the path without its extra settings ("[auto,top_k=1]" -> "[auto]")."""
        name, _, inner = self.path.partition("[")
        return f"{name}[{inner.split(',')[0].rstrip(']')}]" if inner else name

    @classmethod
    def raised(cls, path: str, exc: BaseException) -> CheckResult:
        """The result of a path (or of the whole check) that raised ``exc`` instead of producing tensors."""
        return cls(path, "error", math.nan, math.nan, describe_exception(exc))

    def why(self) -> str:
        if self.error is not None:
            return f"raised {self.error}"
        return f"{self.tensor} rel err {self.rel_err:.2e} > bound {self.bound:.2e}"

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "method": self.method}


def describe_exception(exc: BaseException, width: int = 200) -> str:
    """``"TypeName: first line of the message"`` (the line cut to ``width`` characters; just ``"TypeName"`` for an
    empty message), for one-line tables and reports."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:width] if lines else ''}".rstrip(": ")


def _checked(path: str, run: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """``run()``'s results, or one error result for ``path`` if it raised (the other paths still run)."""
    try:
        return run()
    except Exception as exc:  # any failure of one path is that path's result, not the end of the check
        return [CheckResult.raised(path, exc)]


def failed_methods(results: list[CheckResult]) -> dict[str, str]:
    """Bench method name -> why its check failed (every failing tensor or the exception), for failed paths only."""
    why: dict[str, list[str]] = {}
    for r in results:
        if not r.ok:
            why.setdefault(r.method, []).append(f"{r.path} {r.why()}" if r.path != r.method else r.why())
    return {m: "; ".join(reasons) for m, reasons in why.items()}


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


def _results(path: str, names: list[str], got: list, refs: list, bounds: list[float]) -> list[CheckResult]:
    rows = zip(names, got, refs, bounds, strict=True)
    return [CheckResult(path, name, rel_err(g, r), bound) for name, g, r, bound in rows]


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
        path = f"group_attention[{backend}]"

        def check_group_attention(backend: str = backend, path: str = path) -> list[CheckResult]:
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
            with poisoned_outputs():
                out = moga.group_attention(*leaves, ids, num_groups=M, backend=backend)
                grads = _grads(out, dout, leaves)
            return _results(path, names, [out, *grads], [ref_ga, *ref_ga_grads], ga_bounds)

        results += _checked(path, check_group_attention)

    for top_k in (1, 2):
        path = f"moga_attention[auto,top_k={top_k}]"

        def check_moga_attention(top_k: int = top_k, path: str = path) -> list[CheckResult]:
            leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v, logits)]
            ref = moga_attention_ref(*leaves64[:3], leaves64[3], top_k=top_k)
            ref_grads = _grads(ref, dout.double(), leaves64)
            leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, logits)]
            with poisoned_outputs():
                out = moga.moga_attention(*leaves[:3], leaves[3], top_k=top_k)
                grads = _grads(out, dout, leaves)
            # moga_attention's bounds: the group_attention yardstick (the gate adds one fp32 multiply).
            bounds = [*ga_bounds, ga_bounds[0] if dtype not in FIXED_BOUND else max(ga_bounds[0], 1e-5)]
            return _results(path, [*names, "dlogits"], [out, *grads], [ref, *ref_grads], bounds)

        results += _checked(path, check_moga_attention)
    return results


def format_check(results: list[CheckResult]) -> str:
    lines = [f"{'path':<34} {'tensor':<8} {'rel err':>10} {'bound':>10}  ok"]
    for r in results:
        if r.error is not None:
            lines.append(f"{r.path:<34} {r.tensor:<8} {'-':>10} {'-':>10}  NO: raised {r.error}")
            continue
        lines.append(f"{r.path:<34} {r.tensor:<8} {r.rel_err:>10.2e} {r.bound:>10.2e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)
