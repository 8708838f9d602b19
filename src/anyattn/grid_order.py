"""Space-filling-curve orders of a 2-D grid: `grid_order(H, W, "morton" | "hilbert")`.

Both curves visit every aligned `2^k x 2^k` block of the grid in one contiguous run (the curve finishes
a quadrant before entering the next, recursively), so tokens kept in such an order hold each aligned
window of a power-of-two size as consecutive tokens: windowed attention then needs no gather
(`anyattn.local_global_attention(..., order="morton")`). Grids that are not square powers of two use the
curve of the enclosing `2^m x 2^m` square restricted to the grid; aligned blocks that lie inside the grid
stay contiguous.
"""
from __future__ import annotations

import torch

from .validate import check_positive_int

ORDERS = ("morton", "hilbert")

__all__ = ["grid_order", "ORDERS"]


def _morton(y: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Z-order code: bits of x (column) at even positions, of y (row) at odd positions."""
    code = torch.zeros_like(x)
    for b in range(bits):
        code |= ((x >> b) & 1) << (2 * b)
        code |= ((y >> b) & 1) << (2 * b + 1)
    return code


def _hilbert(y: torch.Tensor, x: torch.Tensor, bits: int) -> torch.Tensor:
    """Index along the Hilbert curve of the `2^bits` square (the classic xy -> d map, vectorized)."""
    n = 1 << bits
    x, y = x.clone(), y.clone()
    d = torch.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += s * s * ((3 * rx.long()) ^ ry.long())
        # Rotate the quadrant so the sub-curve starts and ends where the parent curve expects.
        flip = (~ry) & rx
        x = torch.where(flip, n - 1 - x, x)
        y = torch.where(flip, n - 1 - y, y)
        swap = ~ry
        x, y = torch.where(swap, y, x), torch.where(swap, x, y)
        s >>= 1
    return d


def grid_order(H: int, W: int, kind: str = "morton", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation of a row-major `H x W` grid into a space-filling-curve order.

    Returns `(perm, inverse)`, both int64 `(H * W,)`: `x_curve = x[..., perm, :]` reorders tokens held
    row-major, `x_rowmajor = x_curve[..., inverse, :]` undoes it. kind: "morton" (Z-order) or "hilbert".
    Every aligned `w x w` block (w a power of two, inside the grid) is a contiguous run of the order.
    """
    check_positive_int("H", H)
    check_positive_int("W", W)
    if kind not in ORDERS:
        raise ValueError(f"kind must be one of {ORDERS}, got {kind!r}")
    bits = max(H - 1, W - 1, 1).bit_length()
    y = torch.arange(H, device=device).view(H, 1).expand(H, W).reshape(-1)
    x = torch.arange(W, device=device).view(1, W).expand(H, W).reshape(-1)
    code = (_morton if kind == "morton" else _hilbert)(y, x, bits)
    perm = torch.argsort(code)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(H * W, device=device)
    return perm, inverse
