"""Wall-clock timing and peak memory of one benchmarked call.

CPU: ``time.perf_counter`` around each call. GPU: CUDA events around each call (device time, launches
queued asynchronously). Both: warm-up calls first (compilation, autotuning, allocator growth stay out of
the figures), then the median over repeats. The repeat count adapts to the call's cost so that a slow case
does not eat the sweep: enough repeats to fill ``budget_s``, clamped to [min_repeats, max_repeats].

Every sample is kept (:attr:`Timing.samples_ms`, in call order) with its spread: min, max, quartiles and
:attr:`Timing.rel_iqr`, the interquartile range over the median. A figure whose ``rel_iqr`` exceeds
:data:`NOISY_REL_IQR` is flagged as noisy (a loaded machine, clock changes): read it with care.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

NOISY_REL_IQR = 0.10  # interquartile range above 10% of the median: the figure is flagged as noisy


@dataclass
class Timing:
    median_ms: float
    repeats: int
    samples_ms: list[float]  # every timed call, in order (warm-up calls excluded)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def quartiles_ms(self) -> tuple[float, float]:
        """(25th, 75th) percentiles, linear interpolation between samples (both the sample for one sample)."""
        return quartiles(self.samples_ms)

    @property
    def rel_iqr(self) -> float:
        """(75th - 25th percentile) / median: the spread of the samples relative to the reported figure."""
        q1, q3 = self.quartiles_ms
        return (q3 - q1) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.rel_iqr > NOISY_REL_IQR


def quartiles(samples: list[float]) -> tuple[float, float]:
    """25th and 75th percentiles of ``samples`` (inclusive method: within [min, max] for any count)."""
    if not samples:
        raise ValueError("no samples")
    if len(samples) == 1:
        return samples[0], samples[0]
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, q3


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
