"""mamba-ssm's fused selective scan (Gu & Dao, "Mamba", 2023; `mamba_ssm.ops.selective_scan_interface.
selective_scan_fn`, CUDA extension) for `anyattn.ssm.selective_scan` on CUDA.

anyattn's `selective_scan` takes mamba-ssm's argument layout (u, delta `(B, D, L)`, A `(D, N)`, B, C
`(B, N, L)` or `(B, G, N, L)`, D, z, delta_bias, delta_softplus, return_last_state), so no conversion is
needed; calls with an `initial_state` (which mamba-ssm's function does not take) stay on anyattn's
engine. mamba-ssm is not installed on the machines this was written on (it builds CUDA extensions): this
path is untested until `scripts/gpu-check.sh` runs on a GPU with mamba-ssm installed.
"""
from __future__ import annotations

import torch

from ._imports import load

MODULE = "mamba_ssm.ops.selective_scan_interface"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def import_error() -> str | None:
    return load(MODULE)[1]


def unavailable(u, initial_state=None) -> str | None:
    """Why mamba-ssm's kernel cannot run this scan (None: it can)."""
    if u.device.type != "cuda":
        return f"mamba-ssm's kernel is used on CUDA only (device {u.device.type})"
    if u.dtype not in DTYPES:
        return f"mamba-ssm's kernel takes fp32/fp16/bf16, got {u.dtype}"
    if initial_state is not None:
        return "mamba-ssm's selective_scan_fn takes no initial_state"
    return import_error()


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, kernel=None):
    """mamba-ssm's `selective_scan_fn` (same arguments and layout). Returns y, or `(y, last_state)`."""
    if kernel is None:
        kernel = load(MODULE)[0].selective_scan_fn
    return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
