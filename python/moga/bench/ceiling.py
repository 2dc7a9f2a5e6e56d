"""The device's measured ceilings, against which kernel figures are read (see bench/RESULTS.md).

* matmul: an 8192^3 bf16 ``torch.matmul`` on random data (TFLOP/s);
* copy: a large device-to-device copy (GB/s, counting bytes read plus bytes written).

``python -m moga.bench.ceiling [--json PATH]`` prints both (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def _median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> float:
    """Median TFLOP/s of an n x n x n matmul (2 n^3 FLOPs) on random data."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = _median_ms(lambda: torch.matmul(a, b))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def copy_gbps(num_bytes: int = 2 << 30, device: str = "cuda") -> float:
    """Median GB/s of a device-to-device copy, bytes read plus bytes written."""
    src = torch.randn(num_bytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3) / 1e9


def measure() -> dict:
    return {
        "device": torch.cuda.get_device_name(),
        "matmul_bf16_8192_tflops": matmul_tflops(),
        "copy_gbps": copy_gbps(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the GPU's matmul and copy ceilings")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("moga.bench.ceiling: no CUDA device", file=sys.stderr)
        return 1
    result = measure()
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
