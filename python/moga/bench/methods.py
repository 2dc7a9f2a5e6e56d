"""What gets timed in each case: moga's paths and the baselines, each as a callable over a case's inputs.

A :class:`Method` turns a case's tensors into ``f(q, k, v) -> out``; the runner times ``f`` alone (forward,
under ``torch.no_grad``) and ``f`` plus ``out.backward`` (forward+backward). ``skip_reason`` says, before
anything runs, why a method cannot run this device/dtype at all; the reason is printed in the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import moga
from moga.backends import BACKEND_NAMES, get_backend
from moga.backends.triton_backend import _interpreting
from moga.bench.baselines import (
    dense_sdpa,
    flex_available,
    make_flex_group_attention,
    sorted_recipe,
    varlen_recipe,
    varlen_recipe_reason,
)
from moga.bench.cases import BenchCase, CaseInputs

MOGA_KERNEL_BACKENDS = ("varlen", "cuda", "triton", "triton_tma", "cpu", "torch")
RECIPE_BACKENDS = ("flash_attn", "xformers")  # the paper's recipe through a varlen library kernel


@dataclass
class Method:
    name: str  # shown in the table, e.g. "group_attention[triton]"
    kind: str  # "moga" (a failure here fails the run) or "baseline"
    dense_flops: bool  # counts dense N^2 work (dense SDPA) instead of the grouped work
    build: Callable[[CaseInputs], Callable[..., torch.Tensor]] | None
    skip_reason: str | None = None
    differentiable: bool = True


def _backend_reason(name: str, probe: torch.Tensor) -> str | None:
    mod = get_backend(name)
    if mod is None or not mod.is_available():
        return f"backend {name!r} not available in this installation"
    if name in ("triton", "triton_tma") and _interpreting():
        return "TRITON_INTERPRET=1: interpreter timings say nothing about the kernel"
    return mod.unsupported_reason(probe, probe, probe)


def _group_attention_builder(backend: str, m: int):
    def build(x: CaseInputs):
        return lambda q, k, v: moga.group_attention(q, k, v, x.group_ids, num_groups=m, backend=backend)

    return build


def _moga_attention_builder(x: CaseInputs):
    # The router learns through the gate: with a backward pass, the logits take a gradient too (it accumulates
    # over repeats, an N x M add that costs nothing next to attention).
    logits = x.router_logits.detach().requires_grad_(True)
    return lambda q, k, v: moga.moga_attention(q, k, v, logits)


def _recipe_builder(m: int, recipe=sorted_recipe):
    def build(x: CaseInputs):
        return lambda q, k, v: recipe(q, k, v, x.group_ids, m)

    return build


def methods_for(case: BenchCase, device: torch.device | None, quick: bool) -> list[Method]:
    """Dense SDPA first (the speedup baseline), then moga's paths, then the other baselines.

    ``device=None`` lists every method the registry knows without touching any device: no probe tensor, no
    backend availability check, no skip reasons (for ``moga bench --help``; not for running)."""
    probe = None if device is None else torch.empty(1, case.heads, case.head_dim, device=device, dtype=case.torch_dtype)
    m = case.m
    out = [Method("dense_sdpa", "baseline", True, lambda x: dense_sdpa)]
    for name in MOGA_KERNEL_BACKENDS:
        reason = None
        if probe is not None:
            mod = get_backend(name)
            if mod is None or not mod.is_available():
                continue  # not built/installed: listed once in the header, not per case
            reason = _backend_reason(name, probe)
        out.append(Method(f"group_attention[{name}]", "moga", False, _group_attention_builder(name, m), reason))
    out.append(Method("moga_attention[auto]", "moga", False, _moga_attention_builder))
    out.append(Method("recipe[sdpa]", "baseline", False, _recipe_builder(m)))
    reason = None if device is None else varlen_recipe_reason(device, case.torch_dtype)
    out.append(Method("recipe[varlen]", "baseline", False, _recipe_builder(m, varlen_recipe), reason))
    for name in RECIPE_BACKENDS:
        reason = None if probe is None else _backend_reason(name, probe)
        out.append(Method(f"recipe[{name}]", "baseline", False, _group_attention_builder(name, m), reason))
    out.append(_flex_method(device, quick))
    return out


def _flex_method(device: torch.device | None, quick: bool) -> Method:
    if device is None:  # names only
        return Method("flex_attention", "baseline", False, None)
    reason = flex_available()
    if reason is None and device.type == "cpu" and quick:
        reason = "--quick on CPU: torch.compile of flex_attention takes ~15 s per shape here"
    compiled = True  # eager flex materialises the N^2 score matrix: not a FlexAttention measurement

    def build(x: CaseInputs):
        attend = make_flex_group_attention(compiled)
        return lambda q, k, v: attend(q, k, v, x.group_ids)

    # FlexAttention has no CPU backward (torch raises NotImplementedError): forward only there.
    return Method("flex_attention", "baseline", False, build, reason, differentiable=device.type != "cpu")


def unavailable_backends() -> dict[str, str]:
    """Backends not installed/built here -> why (printed once in the header)."""
    missing = {}
    for name in BACKEND_NAMES:
        mod = get_backend(name)
        if mod is None:
            missing[name] = "module missing or failed to import"
        elif not mod.is_available():
            missing[name] = "is_available() is False"
    return missing
