"""Neighborhood attention layers in 1-D, 2-D and 3-D (Hassani et al., "Neighborhood Attention
Transformer", CVPR 2023; "Dilated Neighborhood Attention Transformer", 2022), with NATTEN's semantics
and its channels-last layout: x `(B, *spatial, dim)` -> `(B, *spatial, dim)`.

Fused qkv projection, heads, `anyattn.softmax.neighborhood.neighborhood` (forward and backward on every
device), output projection; optional axial rotary position embeddings on q and k
(`anyattn.nn.rotary`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..softmax.neighborhood import neighborhood
from ..validate import check_positive_int, check_tensor
from .rotary import RotaryEmbedding, apply_rotary


class _NeighborhoodAttention(nn.Module):
    spatial_dims = 0

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, stride=1, is_causal=False, *,
                 qkv_bias: bool = True, proj_bias: bool = True, rotary: bool = False, rope_base: float = 10000.0,
                 scale: float | None = None):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_heads", num_heads)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be a multiple of num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.kernel_size, self.dilation, self.stride, self.is_causal = kernel_size, dilation, stride, is_causal
        self.scale = scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.rope = RotaryEmbedding(self.head_dim, rope_base) if rotary else None
        if rotary and self.head_dim < 2 * self.spatial_dims:
            raise ValueError(f"rotary needs head_dim >= 2 * {self.spatial_dims} (one channel pair per axis), "
                             f"got head_dim = {self.head_dim}")

    def forward(self, x: torch.Tensor, additional_k: torch.Tensor | None = None,
                additional_v: torch.Tensor | None = None) -> torch.Tensor:
        """x `(B, *spatial, dim)` with `len(spatial) == spatial_dims`; optional extra tokens every query
        attends, already in head layout: additional_k/v `(B, num_heads, N_add, head_dim)`."""
        check_tensor("x", x)
        m = self.spatial_dims
        if x.dim() != m + 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, {', '.join('n%d' % (i + 1) for i in range(m))}, dim={self.dim}), "
                             f"got {tuple(x.shape)}")
        B, spatial = x.shape[0], tuple(x.shape[1:-1])
        qkv = self.qkv(x).reshape(B, *spatial, 3, self.num_heads, self.head_dim)
        # (B, *spatial, 3, H, Dh) -> 3 x (B, H, *spatial, Dh)
        qkv = qkv.movedim(-3, 0).movedim(-2, 2)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.rope is not None:
            cos, sin = self.rope.axial(spatial, device=x.device, dtype=q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = neighborhood(q, k, v, self.kernel_size, self.dilation, self.stride, self.is_causal,
                           additional_k=additional_k, additional_v=additional_v, scale=self.scale)
        out = out.movedim(1, -2).reshape(B, *spatial, self.dim)
        return self.proj(out)

    def extra_repr(self):
        return (f"dim={self.dim}, num_heads={self.num_heads}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, stride={self.stride}, is_causal={self.is_causal}, "
                f"rotary={self.rope is not None}")


class NeighborhoodAttention1d(_NeighborhoodAttention):
    """1-D neighborhood attention layer: x `(B, L, dim)` -> `(B, L, dim)`. kernel_size, dilation, stride:
    ints; is_causal: bool (NATTEN semantics, see `anyattn.neighborhood`)."""

    spatial_dims = 1


class NeighborhoodAttention2d(_NeighborhoodAttention):
    """2-D neighborhood attention layer: x `(B, H, W, dim)` -> `(B, H, W, dim)`. kernel_size, dilation,
    stride: int or pair; is_causal: bool or pair."""

    spatial_dims = 2


class NeighborhoodAttention3d(_NeighborhoodAttention):
    """3-D neighborhood attention layer: x `(B, T, H, W, dim)` -> `(B, T, H, W, dim)`. kernel_size,
    dilation, stride: int or triple; is_causal: bool or triple."""

    spatial_dims = 3
