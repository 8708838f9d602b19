"""Input checks for the public boundary, with messages that name the argument, the expected and
the given value. Engines may assume their inputs passed through here."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Shape:
    """Problem sizes of one attention call: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`."""

    B: int
    H: int
    H_kv: int
    N_q: int
    N_k: int
    D: int
    D_v: int

    @property
    def groups(self) -> int:
        return self.H // self.H_kv


def check_tensor(name: str, x, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_same_device_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.device != ref.device:
            raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {x.device}")
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")


def check_qkv(q, k, v) -> Shape:
    """Validate q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` and return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x, 4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must have a floating dtype {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}")
    check_same_device_dtype("q", q, k=k, v=v)
    B, H, N_q, D = q.shape
    Bk, H_kv, N_k, Dk = k.shape
    Bv, H_v, N_v, D_v = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"k and v must have q's batch size {B}, got k: {Bk}, v: {Bv}")
    if H_v != H_kv:
        raise ValueError(f"v must have k's number of heads {H_kv}, got {H_v}")
    if H_kv == 0 or H % H_kv != 0:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's heads (H_kv = {H_kv}) for grouped-query attention")
    if Dk != D:
        raise ValueError(f"k must have q's head dim {D}, got {Dk}")
    if N_v != N_k:
        raise ValueError(f"v must have k's sequence length {N_k}, got {N_v}")
    if N_q == 0 or N_k == 0 or D == 0 or D_v == 0:
        raise ValueError(
            f"q, k, v must have non-empty sequence and head dims, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    return Shape(B, H, H_kv, N_q, N_k, D, D_v)


def check_scale(scale, D: int) -> float:
    """`scale` defaults to `D ** -0.5`; it must be a finite real number."""
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_broadcast(name: str, shape: tuple, target: tuple, target_names: str) -> None:
    """Require `shape` to broadcast to `target` with every dim either 1 or equal (same rank, no implicit
    leading dims that change meaning)."""
    if len(shape) != len(target):
        raise ValueError(f"{name} must have {len(target)} dims broadcastable to {target_names} = {target}, "
                         f"got shape {shape}")
    for s, t in zip(shape, target):
        if s != 1 and s != t:
            raise ValueError(f"{name} of shape {shape} does not broadcast to {target_names} = {target}")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
