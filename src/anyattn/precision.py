"""Precision policy of the engines: which dtype their matmul operands use, and which dtype holds
statistics (softmax max / sum, LSE, accumulators, states).

- bf16 inputs: matmul operands in bf16 (the GEMM accumulates in fp32 and rounds its result to bf16
  once); everything else in fp32. On this project's reference CPU a bf16 GEMM runs several times
  faster than fp32 (see `anyattn.bench.roofline`).
- fp16 inputs: fp16 operands on CUDA; on CPU bf16 operands, because CPU fp16 GEMMs have no fast path
  (0.2 GFLOP/s measured at 2048^2, against 150 in fp32). Errors are then bf16-sized.
- fp32 / fp64: unchanged.

Outputs are returned in the input dtype.
"""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)


def matmul_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """Dtype of the matmul operands for inputs of `dtype` on `device` (see the module docstring)."""
    if dtype == torch.bfloat16:
        return torch.bfloat16
    if dtype == torch.float16:
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return torch.float64 if dtype == torch.float64 else torch.float32


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of statistics and accumulators: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(dtype, torch.float32)
