"""Neighborhood attention as a mask specification on flattened sequences (METHODS.md "Neighborhood
attention"; Hassani et al., "Neighborhood Attention Transformer", CVPR 2023, and "Dilated Neighborhood
Attention Transformer", 2022; semantics of NATTEN's `na1d/na2d/na3d`).

The spatial grid `shape = (n_1, ..., n_m)` (m = 1, 2, 3) is flattened row-major (last axis fastest), so
query `i` and key `j` of a sequence of `prod(shape)` tokens are grid points. Per axis (kernel k,
dilation d, stride s, causal flag), with coordinates `x` of the query and `y` of the key:

- dilation: the axis splits into d interleaved groups `x % d`; attention stays inside a group and runs
  on the group coordinate `c = x // d`; the group holds `n_g = n // d + (g < n % d)` points;
- non-causal: left span `k // 2`, right span `k // 2 + k % 2 - 1`; the leader of `c` is the center
  query of its stride block, `min((c // s) * s + s // 2, n_g - 1)`; the window center is the leader
  clamped to `[left, n_g - 1 - right]`, so every query sees exactly k keys (windows shift at the
  borders, they do not shrink);
- causal: the leader is the last query of the stride block, `min((c // s) * s + s - 1, n_g - 1)`;
  keys `leader - k < c_y <= c` (no shifting: the first query sees only itself).

Across axes the neighborhood is the product of the per-axis neighborhoods. Constraints: `k * d <= n`
and `s <= k` on every axis.

`window(c, n_g, k, s, causal) -> (lo, hi)` (inclusive bounds in group coordinates) is the one place this
per-axis rule is written; `anyattn.softmax.neighborhood` uses it too.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .core import Mask, Span, _span


def _as_tuple(name: str, value, m: int, kind=int) -> tuple:
    """Normalize an int (or bool) or a per-axis sequence of length m."""
    if isinstance(value, (list, tuple)):
        if len(value) != m:
            raise ValueError(f"{name} must be {'a bool' if kind is bool else 'an int'} or a sequence of {m} "
                             f"{kind.__name__}s "
                             f"(one per spatial axis), got {value!r}")
        vals = tuple(value)
    else:
        vals = (value,) * m
    for v in vals:
        if kind is bool:
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool or a sequence of {m} bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int or a sequence of {m} ints, got {value!r}")
    return vals


def normalize_args(shape: Sequence[int], kernel_size, dilation=1, stride=1, is_causal=False):
    """Check neighborhood parameters against the spatial shape; return per-axis tuples
    `(kernel_size, dilation, stride, is_causal)`. Raises ValueError/TypeError naming the argument."""
    m = len(shape)
    if m not in (1, 2, 3):
        raise ValueError(f"neighborhood attention needs 1, 2 or 3 spatial axes, got spatial shape {tuple(shape)}")
    ks = _as_tuple("kernel_size", kernel_size, m)
    ds = _as_tuple("dilation", dilation, m)
    ss = _as_tuple("stride", stride, m)
    cs = _as_tuple("is_causal", is_causal, m, bool)
    for name, vals in (("kernel_size", ks), ("dilation", ds), ("stride", ss)):
        if any(v < 1 for v in vals):
            raise ValueError(f"{name} must be >= 1 on every axis, got {vals}")
    for a, (n, k, d, s) in enumerate(zip(shape, ks, ds, ss)):
        if k * d > n:
            raise ValueError(f"kernel_size * dilation must be <= the input size on every axis; on axis {a}: "
                             f"kernel_size={k} * dilation={d} = {k * d} > size {n} (spatial shape {tuple(shape)})")
        if s > k:
            raise ValueError(f"stride must be <= kernel_size on every axis; on axis {a}: stride={s} > "
                             f"kernel_size={k}")
    return ks, ds, ss, cs


def group_sizes(n: int, d: int, g):
    """Points in dilation group g (int or tensor) of an axis of n points: `n // d + (g < n % d)`."""
    return n // d + (g < n % d) * 1


def window(c, n_g, k: int, s: int, causal: bool):
    """Inclusive key bounds `(lo, hi)` in group coordinates for query group coordinate c (int tensor),
    group size n_g (int or tensor); see the module docstring."""
    if causal:
        leader = torch.minimum((c // s) * s + (s - 1), torch.as_tensor(n_g - 1, device=c.device))
        lo = torch.clamp(leader - (k - 1), min=0)
        return lo, c
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = torch.minimum((c // s) * s + s // 2, torch.as_tensor(n_g - 1, device=c.device))
    center = torch.maximum(torch.minimum(leader, torch.as_tensor(n_g - 1 - right, device=c.device)),
                           torch.as_tensor(left, device=c.device))
    return center - left, center + right


class Neighborhood(Mask):
    """Neighborhood attention mask (NATTEN semantics) on a flattened grid of `shape` (row-major).

    shape: spatial sizes `(n_1[, n_2[, n_3]])` (an int for 1-D); kernel_size, dilation, stride: int or
    per-axis tuples; is_causal: bool or per-axis tuple. Requires `N_q == N_k == prod(shape)`.
    For the fast engine on `(B, H, *spatial, D)` tensors use `anyattn.neighborhood`.
    """

    def __init__(self, shape, kernel_size, dilation=1, stride=1, is_causal=False):
        if isinstance(shape, int) and not isinstance(shape, bool):
            shape = (shape,)
        if not isinstance(shape, (list, tuple)) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1
                                                             for n in shape):
            raise ValueError(f"shape must be an int or a tuple of 1 to 3 positive ints, got {shape!r}")
        self.shape = tuple(shape)
        self.kernel_size, self.dilation, self.stride, self.is_causal = normalize_args(
            self.shape, kernel_size, dilation, stride, is_causal)
        self.n = math.prod(self.shape)
        strides, acc = [], 1
        for n in reversed(self.shape):
            strides.append(acc)
            acc *= n
        self.flat_strides = tuple(reversed(strides))

    def validate(self, B, H, n_q, n_k, device):
        if n_q != self.n or n_k != self.n:
            raise ValueError(f"Neighborhood{self.shape} needs N_q = N_k = prod(shape) = {self.n}, "
                             f"got N_q = {n_q}, N_k = {n_k}")

    def _coords(self, idx):
        return [(idx // st) % n for st, n in zip(self.flat_strides, self.shape)]

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        ok = None
        for x, y, n, k, d, s, c in zip(self._coords(q_idx), self._coords(kv_idx), self.shape, self.kernel_size,
                                       self.dilation, self.stride, self.is_causal):
            gx, cx, gy, cy = x % d, x // d, y % d, y // d
            lo, hi = window(cx, group_sizes(n, d, gx), k, s, c)
            a = (gx == gy) & (cy >= lo) & (cy <= hi)
            ok = a if ok is None else ok & a
        return ok

    def _query_bounds(self, q0: int, q1: int):
        """Flat index of each query's lowest and highest allowed key (the window's corners)."""
        q = torch.arange(q0, q1)  # host: tile planning
        lo_flat = torch.zeros_like(q)
        hi_flat = torch.zeros_like(q)
        for x, n, k, d, s, c, st in zip(self._coords(q), self.shape, self.kernel_size, self.dilation, self.stride,
                                        self.is_causal, self.flat_strides):
            g, cx = x % d, x // d
            lo, hi = window(cx, group_sizes(n, d, g), k, s, c)
            lo_flat += (lo * d + g) * st
            hi_flat += (hi * d + g) * st
        return lo_flat, hi_flat

    def span(self, q0, q1, n_q, n_k) -> Span:
        return self.tile_ranges(q1 - q0, n_k, q1 - q0, _offset=q0)[0]

    def tile_ranges(self, n_q, n_k, block_q, _offset: int = 0) -> list[Span]:
        """Tight key ranges per query tile: from the lowest to the highest window corner of the tile.
        Full ranges (keys every query of the tile sees) are given in 1-D without dilation, where windows
        are contiguous; elsewhere they are left empty (conservative)."""
        lo, hi = self._query_bounds(_offset, _offset + n_q)
        T = (n_q + block_q - 1) // block_q
        pad = T * block_q - n_q
        big = torch.iinfo(torch.long).max
        lo_p = torch.cat([lo, lo.new_full((pad,), big)]).view(T, block_q)
        hi_p = torch.cat([hi, hi.new_full((pad,), -1)]).view(T, block_q)
        contiguous = len(self.shape) == 1 and self.dilation[0] == 1
        rows = torch.stack([lo_p.amin(1), hi_p.amax(1) + 1,
                            torch.cat([lo, lo.new_full((pad,), -1)]).view(T, block_q).amax(1),
                            torch.cat([hi, hi.new_full((pad,), big - 1)]).view(T, block_q).amin(1) + 1], 1).tolist()
        out = []
        for a, b_, fa, fb in rows:
            out.append(_span(a, b_, fa, fb, n_k) if contiguous else _span(a, b_, 0, 0, n_k))
        return out

    def __repr__(self):
        return (f"Neighborhood(shape={self.shape}, kernel_size={self.kernel_size}, dilation={self.dilation}, "
                f"stride={self.stride}, is_causal={self.is_causal})")
