"""Mask and bias specs seen on a sub-block of a larger problem (the spec layer's answer to "evaluate this
spec on these query positions against these key positions", which sharded attention asks per block).

A sub-block is queries at global positions `q.start + q.step * i` (i < q.count) against keys at
`k.start + k.step * j`, on the heads `[h0, h1)` of the global problem `(B, H, n_q, n_k)`. `BlockMask`
and `BlockBias` wrap a (validated) global spec so that any engine runs the sub-block as an ordinary
local problem of `q.count x k.count`:

- `tile()` maps local tile coordinates to global positions: the spec's own `tile()` when both runs are
  contiguous (step 1), else `Mask.allowed` / `Bias.at` on index tensors;
- `tile_ranges()` maps the global spec's key ranges (`GlobalSpans`: its `tile_ranges` at one block
  size, computed once per problem) to local key ranges, conservatively.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .biases import Bias
from .masks import Mask, Span

try:  # the span normalizer of the mask specs (masks.py, or masks/core.py where masks is a package)
    from .masks import _span
except ImportError:  # pragma: no cover
    from .masks.core import _span


class Run(NamedTuple):
    """Positions `start + step * i` for i < count."""

    start: int
    count: int
    step: int

    def sub(self, i0: int, i1: int) -> "Run":
        return Run(self.start + self.step * i0, i1 - i0, self.step)

    def first_at_or_after(self, g: int) -> int:
        """Local index of the first position >= g, clamped to [0, count]."""
        return max(0, min(self.count, -(-(g - self.start) // self.step)))

    def indices(self, i0: int, i1: int, device) -> torch.Tensor:
        return torch.arange(self.start + self.step * i0, self.start + self.step * i1, self.step, device=device)


class GlobalSpans:
    """A global mask's `tile_ranges(n_q, n_k, block)`, queried for any global query range."""

    def __init__(self, mask: Mask, n_q: int, n_k: int, block: int):
        self.block, self.n_k = block, n_k
        self.spans = mask.tile_ranges(n_q, n_k, block)

    def over(self, g0: int, g1: int) -> Span:
        """A valid span for queries `[g0, g1)`: union of the covered tiles' ranges, intersection of their
        full ranges."""
        parts = self.spans[g0 // self.block:(g1 - 1) // self.block + 1]
        live = [s for s in parts if s.hi > s.lo]
        if not live:
            return Span(0, 0, 0, 0)
        lo, hi = min(s.lo for s in live), max(s.hi for s in live)
        if len(live) < len(parts):
            return _span(lo, hi, 0, 0, self.n_k)
        return _span(lo, hi, max(s.full_lo for s in parts), min(s.full_hi for s in parts), self.n_k)


def _idx(B: int, heads: tuple, device):
    b = torch.arange(B, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads[0], heads[1], device=device).view(1, -1, 1, 1)
    return b, h


def _slice_heads(t: torch.Tensor, heads: tuple, H: int) -> torch.Tensor:
    if t.shape[1] == 1 or (heads[0] == 0 and heads[1] == H):
        return t
    return t[:, heads[0]:heads[1]]


class BlockMask(Mask):
    """The global `mask` on queries `q` x keys `k` (Runs) and heads `heads` of a `(B, H, n_q, n_k)`
    problem. `spans`: the global mask's `GlobalSpans` (shared by all blocks of one problem)."""

    def __init__(self, mask: Mask, q: Run, k: Run, B: int, H: int, n_q: int, n_k: int, heads=None,
                 spans: GlobalSpans | None = None):
        self.mask, self.q, self.k = mask, q, k
        self.B, self.H, self.n_q, self.n_k = B, H, n_q, n_k
        self.heads = (0, H) if heads is None else tuple(heads)
        self.spans = spans

    def validate(self, B, H, n_q, n_k, device):
        """The global spec was validated on the global problem; only the sub-block's sizes are checked."""
        if (n_q, n_k) != (self.q.count, self.k.count) or H != self.heads[1] - self.heads[0]:
            raise ValueError(f"BlockMask covers {self.heads[1] - self.heads[0]} heads x {self.q.count} x "
                             f"{self.k.count}, got H = {H}, N_q = {n_q}, N_k = {n_k}")

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        return self.mask.allowed(b, h + self.heads[0], self.q.start + self.q.step * q_idx,
                                 self.k.start + self.k.step * kv_idx, self.n_q, self.n_k)

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        if self.q.step == 1 and self.k.step == 1:
            t = self.mask.tile(self.q.start + q0, self.q.start + q1, self.k.start + k0, self.k.start + k1,
                               self.n_q, self.n_k, device)
            return _slice_heads(t, self.heads, self.H)
        b, h = _idx(self.B, self.heads, device)
        return self.mask.allowed(b, h, self.q.indices(q0, q1, device).view(1, 1, -1, 1),
                                 self.k.indices(k0, k1, device).view(1, 1, 1, -1), self.n_q, self.n_k)

    def tile_ranges(self, n_q, n_k, block_q):
        if self.spans is None:
            return super().tile_ranges(n_q, n_k, block_q)
        out = []
        for t0 in range(0, n_q, block_q):
            t1 = min(t0 + block_q, n_q)
            s = self.spans.over(self.q.start + self.q.step * t0, self.q.start + self.q.step * (t1 - 1) + 1)
            k = self.k
            out.append(_span(k.first_at_or_after(s.lo), k.first_at_or_after(s.hi),
                             k.first_at_or_after(s.full_lo), k.first_at_or_after(s.full_hi), n_k))
        return out

    def dense(self, B, H, n_q, n_k, device):
        return self.tile(0, n_q, 0, n_k, n_q, n_k, device)

    def __repr__(self):
        return f"BlockMask({self.mask!r}, q={tuple(self.q)}, k={tuple(self.k)}, heads={self.heads})"


class BlockBias(Bias):
    """The global `bias` on queries `q` x keys `k` (Runs) and heads `heads` of a `(B, H, n_q, n_k)` problem.
    Its tensors are the global spec's: gradients reach them (each block contributes its part)."""

    def __init__(self, bias: Bias, q: Run, k: Run, B: int, H: int, n_q: int, n_k: int, heads=None,
                 device=None):
        self.bias, self.q, self.k = bias, q, k
        self.B, self.H, self.n_q, self.n_k = B, H, n_q, n_k
        self.heads = (0, H) if heads is None else tuple(heads)
        self.device = device

    def tensors(self):
        return self.bias.tensors()

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        if self.q.step == 1 and self.k.step == 1:
            t = self.bias.tile(tensors, self.q.start + q0, self.q.start + q1, self.k.start + k0,
                               self.k.start + k1, self.n_q, self.n_k)
            return _slice_heads(t, self.heads, self.H)
        device = next((t.device for t in tensors), self.device)
        b, h = _idx(self.B, self.heads, device)
        return self.bias.at(tensors, b, h, self.q.indices(q0, q1, device).view(1, 1, -1, 1),
                            self.k.indices(k0, k1, device).view(1, 1, 1, -1), self.n_q, self.n_k)

    def dense(self, n_q, n_k):
        return self.tile(self.tensors(), 0, n_q, 0, n_k, n_q, n_k)

    def __repr__(self):
        return f"BlockBias({self.bias!r}, q={tuple(self.q)}, k={tuple(self.k)}, heads={self.heads})"
