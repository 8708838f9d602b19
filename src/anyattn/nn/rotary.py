"""Rotary position embeddings (RoPE; Su et al., "RoFormer: Enhanced Transformer with Rotary Position
Embedding", 2021), 1-D and axial N-D (each spatial axis rotates its own share of the channels, as in
axial RoPE for images and video, e.g. Heo et al., "Rotary Position Embedding for Vision Transformer",
ECCV 2024).

Convention ("rotate half", GPT-NeoX): with `h = cos.shape[-1]`, channel i is paired with channel i + h for
i < h; channels from 2h on are left unchanged. `q_m . k_n` after rotation depends on positions only
through m - n (per axis for the axial form).
"""
from __future__ import annotations

import torch
from torch import nn

from ..validate import check_positive_int, check_tensor


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x `(..., D)` by angles whose cos, sin `(..., h)` broadcast against `x[..., :h]`, with
    `2h <= D` (rotate-half pairing; channels from 2h on pass through). Differentiable in x."""
    check_tensor("x", x)
    h = cos.shape[-1]
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if 2 * h > x.shape[-1]:
        raise ValueError(f"cos/sin rotate 2 * {h} = {2 * h} channels but x has only {x.shape[-1]} (shape "
                         f"{tuple(x.shape)})")
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2, rest = x[..., :h], x[..., h:2 * h], x[..., 2 * h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class RotaryEmbedding(nn.Module):
    """RoPE tables for a head dim `dim` (even). `forward(positions)` gives cos, sin `(*positions.shape,
    dim/2)` for 1-D integer (or float) positions; `axial(shape)` gives cos, sin `(*shape, dim/2)` for a
    grid of 1 to 3 axes: the dim/2 frequency slots are split evenly between the axes (each axis gets
    `dim // (2m)` slots with frequencies `base^(-j / (dim // (2m)))`); leftover slots get angle 0."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        check_positive_int("dim", dim, 2)
        if dim % 2:
            raise ValueError(f"dim must be even (channels rotate in pairs), got {dim}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or base <= 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.dim, self.base = dim, float(base)

    def _inv_freq(self, slots: int, device) -> torch.Tensor:
        return self.base ** (-torch.arange(slots, dtype=torch.float64, device=device) / max(slots, 1))

    def forward(self, positions: torch.Tensor, dtype=torch.float32):
        check_tensor("positions", positions)
        ang = positions.to(torch.float64)[..., None] * self._inv_freq(self.dim // 2, positions.device)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def axial(self, shape, device=None, dtype=torch.float32):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        m = len(shape)
        if not 1 <= m <= 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
            raise ValueError(f"shape must be 1 to 3 positive ints, got {shape!r}")
        half = self.dim // 2
        per = half // m
        if per == 0:
            raise ValueError(f"dim = {self.dim} is too small for {m} axes (needs at least {2 * m})")
        inv = self._inv_freq(per, device)
        grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float64, device=device) for n in shape], indexing="ij")
        parts = [g[..., None] * inv for g in grids]
        if half > per * m:
            parts.append(torch.zeros(*shape, half - per * m, dtype=torch.float64, device=device))
        ang = torch.cat(parts, dim=-1)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def extra_repr(self):
        return f"dim={self.dim}, base={self.base:g}"
