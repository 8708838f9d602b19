"""Four-direction unrolling of 2-D feature maps for 1-D scans (VMamba's cross-scan, Liu et al., "VMamba:
Visual State Space Model", 2024; used by Serpent, Sepehri et al., 2024):

    cross_scan_2d(x)  (B, C, H, W) -> (B, 4, C, H*W): row-major, column-major, and both reversed
    cross_merge_2d(y) (B, 4, C, H*W) -> (B, C, H, W): each direction mapped back to the grid, summed

`cross_merge_2d` is the adjoint of `cross_scan_2d` (so `cross_merge_2d(cross_scan_2d(x)) == 4 x`). Around
them, `anyattn.ssm.selective_scan` runs the four directions as one call (directions as channel groups).
"""
from __future__ import annotations

import torch

from ._checks import check_tensor

__all__ = ["cross_scan_2d", "cross_merge_2d"]


def cross_scan_2d(x: torch.Tensor) -> torch.Tensor:
    """x `(B, C, H, W)` -> `(B, 4, C, H * W)`: direction 0 row-major (left to right, top to bottom),
    1 column-major (top to bottom, left to right), 2 and 3 the reverses of 0 and 1."""
    check_tensor("x", x, 4)
    B, C, H, W = x.shape
    rows = x.reshape(B, C, H * W)
    cols = x.transpose(2, 3).reshape(B, C, H * W)
    fwd = torch.stack([rows, cols], 1)
    return torch.cat([fwd, fwd.flip(-1)], 1)


def cross_merge_2d(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """y `(B, 4, C, H * W)` in `cross_scan_2d`'s directions -> `(B, C, H, W)`, the sum of the four maps."""
    check_tensor("y", y, 4)
    B, K, C, L = y.shape
    if K != 4 or L != H * W:
        raise ValueError(f"y must have shape (B, 4, C, H * W) = (B, 4, C, {H * W}), got {tuple(y.shape)}")
    y = y[:, :2] + y[:, 2:].flip(-1)
    return y[:, 0].reshape(B, C, H, W) + y[:, 1].reshape(B, C, W, H).transpose(2, 3)
