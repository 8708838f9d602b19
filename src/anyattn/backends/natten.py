"""NATTEN's fused neighborhood-attention kernels (Hassani et al.; `natten.na1d/na2d/na3d`, natten >= 0.20)
for `anyattn.neighborhood` on CUDA.

Layout: anyattn `(B, H, *spatial, D)` <-> NATTEN `(B, *spatial, H, D)` (heads last); LSE
`(B, *spatial, H)` <-> `(B, H, *spatial)`. NATTEN takes the same parameters with the same semantics
(kernel_size, stride, dilation, is_causal, scale, additional keys/values, grouped-query heads) and
returns the LSE; its backward is its own.
"""
from __future__ import annotations

import torch

from ._imports import load

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def import_error() -> str | None:
    mod, why = load("natten")
    if why is None and not all(hasattr(mod, f) for f in ("na1d", "na2d", "na3d")):
        why = f"natten {getattr(mod, '__version__', '?')} has no na1d/na2d/na3d functional API (natten >= 0.20)"
    return why


def unavailable(q) -> str | None:
    """Why NATTEN cannot run neighborhood attention on q's device and dtype (None: it can)."""
    if q.device.type != "cuda":
        return f"NATTEN's kernels are used on CUDA only (device {q.device.type})"
    if q.dtype not in DTYPES:
        return f"NATTEN's kernels take fp32/fp16/bf16, got {q.dtype}"
    return import_error()


def to_natten(x):
    """`(B, H, *spatial, D)` -> `(B, *spatial, H, D)` (contiguous: NATTEN's kernels read that layout)."""
    return x.movedim(1, -2).contiguous()


def from_natten(x):
    """`(B, *spatial, H, D)` -> `(B, H, *spatial, D)` (a view)."""
    return x.movedim(-2, 1)


def neighborhood(q, k, v, kernel_size, dilation, stride, is_causal, *, scale, additional_k=None,
                 additional_v=None, return_lse=False, kernel=None):
    """NATTEN on anyattn-layout tensors; per-axis tuples as from `masks.neighborhood.normalize_args`.
    additional_k/v `(B, H_kv, N_add, D)`. Returns out `(B, H, *spatial, D_v)` (and lse `(B, H, *spatial)`).
    `kernel`: the `na{1,2,3}d` function to call (default: NATTEN's; tests pass NATTEN's CPU path)."""
    m = q.dim() - 3
    if kernel is None:
        mod, _ = load("natten")
        kernel = {1: mod.na1d, 2: mod.na2d, 3: mod.na3d}[m]
    extra = {}
    if additional_k is not None:
        extra = dict(additional_keys=additional_k.transpose(1, 2), additional_values=additional_v.transpose(1, 2))
    res = kernel(to_natten(q), to_natten(k), to_natten(v), kernel_size=tuple(kernel_size), stride=tuple(stride),
                 dilation=tuple(dilation), is_causal=tuple(is_causal), scale=scale, return_lse=return_lse, **extra)
    if not return_lse:
        return from_natten(res), None
    out, lse = res
    return from_natten(out), lse.movedim(-1, 1)
