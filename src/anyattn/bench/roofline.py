"""The practical roofline: this machine's measured matmul throughput."""
from __future__ import annotations

import torch

from .timing import alternating, median


def matmul_gflops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Median GFLOP/s of an `n x n` by `n x n` matmul (2 n^3 FLOPs) on this device."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = alternating({"mm": lambda: torch.mm(a, b)}, budget_s=2.0, min_repeats=5, device_type=torch.device(device).type)
    return 2 * n ** 3 / median(t["mm"]) / 1e9
