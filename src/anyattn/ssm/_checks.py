"""Argument checks shared by the SSM ops. Messages name the argument, the expected and the given value."""
from __future__ import annotations

import torch

from ..validate import FLOAT_DTYPES, check_positive_int, check_tensor

__all__ = ["check_float", "check_shape", "check_mode", "compute_dtype", "check_positive_int", "check_tensor",
           "MODES"]

MODES = ("chunk", "recurrent")


def check_float(name: str, x, ref: torch.Tensor | None = None, *, allow_complex: bool = False) -> None:
    """x must be a floating tensor (one of FLOAT_DTYPES; complex allowed if asked) on ref's device."""
    check_tensor(name, x)
    ok = x.dtype in FLOAT_DTYPES or (allow_complex and x.dtype in (torch.complex64, torch.complex128))
    if not ok:
        allowed = [str(d) for d in FLOAT_DTYPES]
        if allow_complex:
            allowed += ["torch.complex64", "torch.complex128"]
        raise TypeError(f"{name} must have a {'floating or complex' if allow_complex else 'floating'} dtype "
                        f"{allowed}, got {x.dtype}")
    if ref is not None and x.device != ref.device:
        raise ValueError(f"{name} must be on the same device as u ({ref.device}), got {x.device}")


def check_shape(name: str, x: torch.Tensor, expected: tuple, desc: str) -> None:
    """x.shape must equal `expected` (described symbolically by `desc`, e.g. "(B, D, L)")."""
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {desc} = {tuple(expected)}, got {tuple(x.shape)}")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def compute_dtype(*xs) -> torch.dtype:
    """float64 if any given tensor is float64 (or complex128), else float32: states and decays accumulate
    in at least fp32, whatever the input precision."""
    for x in xs:
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float64, torch.complex128):
            return torch.float64
    return torch.float32
