"""``apply_moga(..., router_init=calibrate)``: learned routers warm-started from k-means of the model's own hidden
states (issue #15).

Before any layer is converted, forward pre-hooks on the chosen attention layers record the hidden states each
layer's router will see (the ``hidden_states`` argument of the attention module, i.e. of its processor) while
``calibrate(transformer)`` runs the still unconverted model under ``torch.no_grad()``. Each layer's router is then
:meth:`moga.MoGARouter.from_kmeans` of the tokens recorded for it: its initial argmax is the k-means assignment of
those tokens. The hooks are removed whatever happens, so a failing calibration leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from moga.router import MoGARouter

RouterInit = Callable[[nn.Module], Any]


def check_router_init(router_init: Any, max_tokens: Any) -> None:
    """TypeError / ValueError for a calibration that is not a callable or a bad token cap."""
    if not callable(router_init):
        raise TypeError(
            "router_init must be a callable that runs the transformer forward on calibration inputs, e.g. "
            f"lambda model: [model(**batch) for batch in batches]; got {type(router_init).__name__}"
        )
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"router_init_tokens must be a positive int, got {max_tokens!r}")


def _sample_tokens(x: torch.Tensor, max_tokens: int, seed: int) -> torch.Tensor:
    """x (..., C) -> (n, C) its tokens, all of them in order if at most ``max_tokens``, else a uniform random
    sample of ``max_tokens`` (seeded, on x's device)."""
    tokens = x.detach().reshape(-1, x.shape[-1])
    if tokens.shape[0] <= max_tokens:
        return tokens.clone()
    gen = torch.Generator(device=tokens.device)
    gen.manual_seed(seed)
    keep = torch.randperm(tokens.shape[0], generator=gen, device=tokens.device)[:max_tokens]
    return tokens[keep.sort().values]


def record_router_inputs(
    transformer: nn.Module,
    layers: Sequence[tuple[str, nn.Module]],
    calibrate: RouterInit,
    max_tokens: int,
) -> list[torch.Tensor]:
    """Run ``calibrate(transformer)`` without gradients and return, for each of ``layers`` (name, attention
    module), the (n, C) router inputs it saw: every call's ``hidden_states`` (B, N, C) flattened to tokens,
    at most ``max_tokens`` of them per call (a seeded uniform sample beyond that), concatenated over the calls.

    Raises ValueError when a layer saw no call. The hooks are removed before returning or raising.
    """
    records: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook_for(i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"router_init: cannot find the hidden_states of {layers[i][0]} in its call")
            records[i].append(_sample_tokens(x, max_tokens, seed=len(records[i])))

        return hook

    handles = [attn.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, (_, attn) in enumerate(layers)]
    try:
        with torch.no_grad():
            calibrate(transformer)
    finally:
        for h in handles:
            h.remove()
    missing = [name for (name, _), rec in zip(layers, records, strict=True) if not rec]
    if missing:
        raise ValueError(f"router_init ran no forward through {', '.join(missing)}: nothing to calibrate on")
    return [torch.cat(rec) for rec in records]


def kmeans_routers(inputs: Sequence[torch.Tensor], num_groups: int) -> list[MoGARouter]:
    """One :meth:`moga.MoGARouter.from_kmeans` router (defaults: 20 iterations, seed 0, k-means++, automatic
    temperature) per layer's recorded (n, C) router inputs; ValueError from it (e.g. fewer tokens than groups)."""
    return [MoGARouter.from_kmeans(x, num_groups) for x in inputs]
