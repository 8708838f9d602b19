"""The device benchmarks run on: `anyattn bench --device cuda` sets `ANYATTN_BENCH_DEVICE` (inherited by
the memory subprocesses). Workloads build their inputs on the CPU (seeded generators) and the runner
moves them with `on_device`; the GPU workloads (`workloads/gpu.py`) build theirs there directly."""
from __future__ import annotations

import os

import torch

ENV = "ANYATTN_BENCH_DEVICE"


def bench_device() -> torch.device:
    return torch.device(os.environ.get(ENV, "cpu"))


def on_device(inputs: dict, device: torch.device | None = None) -> dict:
    """Inputs moved to the bench device; tensors that took gradients stay leaves that take them."""
    device = device or bench_device()
    if device.type == "cpu":
        return inputs
    out = {}
    for name, x in inputs.items():
        if isinstance(x, torch.Tensor) and x.device != device:
            x = x.detach().to(device).requires_grad_(x.requires_grad)
        out[name] = x
    return out
