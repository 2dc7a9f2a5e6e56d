"""Benchmark cases: problem sizes, group-size distributions and the inputs built from them.

Group ids are built with *exact* group sizes (balanced: N/M each, remainder spread over the first groups;
Zipf: sizes proportional to 1/rank^s, s=1, summing to N) and then randomly permuted over token positions,
so every method sees the same ragged, unsorted assignment a real router would produce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

DISTRIBUTIONS = ("balanced", "zipf")


def balanced_sizes(n: int, m: int) -> list[int]:
    """n tokens over m groups, sizes differing by at most one (the first n % m groups get one more)."""
    _check_n_m(n, m)
    base, extra = divmod(n, m)
    return [base + (1 if g < extra else 0) for g in range(m)]


def zipf_sizes(n: int, m: int, s: float = 1.0) -> list[int]:
    """n tokens over m groups with size_g proportional to 1 / (g + 1)^s, rounded so the sizes sum to n.

    Largest-remainder rounding keeps the sum exact; sizes stay non-increasing in g.
    """
    _check_n_m(n, m)
    if s < 0:
        raise ValueError(f"zipf exponent s must be >= 0, got {s}")
    weights = [1.0 / (g + 1) ** s for g in range(m)]
    total = sum(weights)
    exact = [n * w / total for w in weights]
    sizes = [int(x) for x in exact]
    short = n - sum(sizes)
    # Hand the missing tokens to the largest fractional parts (ties to the lower group: stays non-increasing).
    by_remainder = sorted(range(m), key=lambda g: (-(exact[g] - sizes[g]), g))
    for g in by_remainder[:short]:
        sizes[g] += 1
    return sizes


def group_sizes(n: int, m: int, distribution: str) -> list[int]:
    if distribution == "balanced":
        return balanced_sizes(n, m)
    if distribution == "zipf":
        return zipf_sizes(n, m)
    raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")


def group_ids_from_sizes(sizes: list[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """(N,) int64 group ids holding exactly sizes[g] tokens of group g, randomly permuted over positions."""
    if any(s < 0 for s in sizes):
        raise ValueError(f"group sizes must be non-negative, got {sizes}")
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64))
    return ids[torch.randperm(ids.numel(), generator=generator)]


def _check_n_m(n: int, m: int) -> None:
    if n < 0 or m < 1:
        raise ValueError(f"need n >= 0 tokens and m >= 1 groups, got n={n}, m={m}")


@dataclass(frozen=True)
class BenchCase:
    """One benchmark problem: batch 1, N tokens, Hq = Hkv heads of dim D, M groups."""

    n: int
    m: int
    distribution: str
    heads: int
    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"

    @property
    def sizes(self) -> list[int]:
        return group_sizes(self.n, self.m, self.distribution)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        return f"N={self.n} M={self.m} {self.distribution}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class CaseInputs:
    """Tensors of one case: q, k, v (1, N, H, D); group_ids (1, N); router_logits (1, N, M) whose argmax is
    group_ids (so the MoGA layer path routes to exactly the case's group sizes)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    group_ids: torch.Tensor
    router_logits: torch.Tensor


def make_inputs(case: BenchCase, device: torch.device | str, seed: int = 0) -> CaseInputs:
    """The case's q, k, v (1, n, heads, head_dim) drawn on ``device`` in the case's dtype (at 580K tokens x 40 heads
    x 128 a CPU draw of the three tensors alone took ~40 s), group ids and router logits (host-drawn, small)."""
    gen = torch.Generator().manual_seed(seed)
    ids = group_ids_from_sizes(case.sizes, gen)
    shape = (1, case.n, case.heads, case.head_dim)
    device_gen = torch.Generator(device=device).manual_seed(seed + 1)
    q, k, v = (
        torch.randn(shape, generator=device_gen, device=device, dtype=case.torch_dtype) for _ in range(3)
    )
    # Logits: small noise plus a margin of 4 on the assigned group, so softmax's argmax is the assigned group.
    logits = 0.1 * torch.randn(1, case.n, case.m, generator=gen)
    logits.scatter_add_(-1, ids.view(1, -1, 1), torch.full((1, case.n, 1), 4.0))
    return CaseInputs(q, k, v, ids.view(1, -1).to(device), logits.to(device))


def gpu_sweep(quick: bool = False) -> list[BenchCase]:
    """bf16, D=128, Hq=40; N from 8K to 580,000; M in {4, 8, 16}; balanced and Zipf group sizes."""
    ns = [8192, 32768, 131072, 580_000] if quick else [8192, 16384, 32768, 65536, 131072, 262144, 580_000]
    ms = [8] if quick else [4, 8, 16]
    return [BenchCase(n, m, d, 40, 128, "bfloat16") for n in ns for m in ms for d in DISTRIBUTIONS]


def cpu_sweep(quick: bool = False) -> list[BenchCase]:
    """fp32, H=4, D=64, M=8 balanced; N up to 16K (--quick: two small N)."""
    ns = [1024, 4096] if quick else [1024, 2048, 4096, 8192, 16384]
    return [BenchCase(n, 8, "balanced", 4, 64, "float32") for n in ns]
