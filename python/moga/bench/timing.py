"""Wall-clock timing and peak memory of one benchmarked call.

CPU: ``time.perf_counter`` around each call. GPU: CUDA events around each call (device time, launches
queued asynchronously). Both: warm-up calls first (compilation, autotuning, allocator growth stay out of
the figures), then the median over repeats. The repeat count adapts to the call's cost so that a slow case
does not eat the sweep: enough repeats to fill ``budget_s``, clamped to [min_repeats, max_repeats].
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    repeats: int
    samples_ms: list[float]


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_call(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 50,
    budget_s: float = 1.0,
) -> Timing:
    """Median time of ``fn()`` in milliseconds over adaptive repeats, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    samples = [_time_once(fn, device)]
    wanted = int(budget_s * 1e3 / max(samples[0], 1e-3))
    for _ in range(max(min_repeats, min(max_repeats, wanted)) - 1):
        samples.append(_time_once(fn, device))
    return Timing(statistics.median(samples), len(samples), samples)


def peak_extra_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """GPU: peak bytes allocated by one ``fn()`` call beyond what was live before it
    (``torch.cuda.max_memory_allocated``). CPU: None; tracemalloc cannot see torch's allocator and the
    process RSS peak is a lifetime high-water mark, so no honest per-call figure exists there."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
