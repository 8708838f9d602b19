"""`ChimeraLayer`: a Chimera mixer for multivariate time series `x (B, V, T, dim)` (Behrouz et al.,
"Chimera: Effectively Modeling Multivariate Time Series with 2-Dimensional State Space Models", 2024),
on `anyattn.ssm.chimera` (one 2-D selective SSM head; equations in its module doc).

    (u, z) = in_proj(x)
    per head (trend, seasonal), per variate direction (forward, and reversed when bidirectional):
        dt_t, dt_v = softplus(W u + b) (per channel);  (B1, B2, C1, C2) = W_bc u;  A1, A4 = -exp(A_log)
        y_h = chimera(u, dt_t, dt_v, (A1, A2, A3, A4), B1, B2, C1, C2, D)
    y = out_proj(sum_h y_h * SiLU(z))

The two heads share the recurrence and differ in their parameters and in the initial range of the
steps (trend: dt in [1e-3, 1e-2], long memory; seasonal: dt in [1e-2, 1e-1]) -- our reading of "two
heads with different discretizations", see docs/structured.md. Variates have no natural order, so the
bidirectional layer also runs the recurrence over the reversed variate axis (shared parameters).

Streams over time: `forward(x, state=None, use_cache=False) -> (y, state)` with state the list of
`(h1, h2)` pairs (one per head and direction) at the last time step. Not in `MIXERS` (its input is
`(B, V, T, dim)`, not a sequence `(B, L, dim)`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ssm.chimera import chimera
from ..validate import check_positive_int, check_tensor

__all__ = ["ChimeraLayer"]

HEAD_DT_RANGES = {"trend": (1e-3, 1e-2), "seasonal": (1e-2, 1e-1)}


class _Head(nn.Module):
    def __init__(self, dim, d_state, dt_range):
        super().__init__()
        self.dt = nn.Linear(dim, 2 * dim)                                   # (dt_t, dt_v)
        with torch.no_grad():
            lo, hi = dt_range
            dt = torch.exp(torch.rand(2 * dim) * (math.log(hi) - math.log(lo)) + math.log(lo))
            self.dt.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.dt.weight.mul_(0.1)
        self.bc = nn.Linear(dim, 4 * d_state, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(2, dim, 1))
        self.A_couple = nn.Parameter(0.1 * torch.randn(2, dim, d_state))    # A2, A3
        self.D = nn.Parameter(torch.ones(dim))

    def forward(self, u, state, mode):
        """u `(B, V, T, dim)` -> y `(B, V, T, dim)` and the last (h1, h2)."""
        dt_t, dt_v = F.softplus(self.dt(u)).permute(0, 3, 1, 2).chunk(2, 1)    # (B, dim, V, T) each
        B1, B2, C1, C2 = self.bc(u).permute(0, 3, 1, 2).chunk(4, 1)           # (B, N, V, T) each
        A = (-torch.exp(self.A_log[0]), self.A_couple[0], self.A_couple[1], -torch.exp(self.A_log[1]))
        y, last = chimera(u.permute(0, 3, 1, 2), dt_t, dt_v, A, B1, B2, C1, C2, self.D, initial_state=state,
                          output_final_state=True, mode=mode)
        return y.permute(0, 2, 3, 1), last


class ChimeraLayer(nn.Module):
    """Chimera mixer on `(B, V, T, dim)` (module doc). d_state: N; heads: names from `HEAD_DT_RANGES`;
    bidirectional: also scan the variates in reverse; mode: `chimera`'s "rows" or "wavefront"."""

    def __init__(self, dim: int, d_state: int = 16, *, heads=("trend", "seasonal"), bidirectional: bool = True,
                 mode: str = "rows"):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.d_state = check_positive_int("d_state", d_state)
        unknown = [h for h in heads if h not in HEAD_DT_RANGES]
        if not heads or unknown:
            raise ValueError(f"heads must be a non-empty sequence of {sorted(HEAD_DT_RANGES)}, got {heads!r}")
        self.head_names, self.bidirectional, self.mode = tuple(heads), bool(bidirectional), mode
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.heads = nn.ModuleList(_Head(dim, d_state, HEAD_DT_RANGES[h]) for h in heads)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, state=None, use_cache: bool = False):
        check_tensor("x", x, 4)
        if x.shape[-1] != self.dim or 0 in x.shape:
            raise ValueError(f"x must have shape (B, V, T, dim={self.dim}), got {tuple(x.shape)}")
        n_dir = 2 if self.bidirectional else 1
        if state is not None and (not isinstance(state, (list, tuple)) or len(state) != len(self.heads) * n_dir):
            raise TypeError(f"state must be None or the list of {len(self.heads) * n_dir} (h1, h2) pairs this "
                            "layer returned")
        u, z = self.in_proj(x).chunk(2, -1)
        y = torch.zeros_like(u)
        new = []
        for i, head in enumerate(self.heads):
            for d in range(n_dir):
                s = None if state is None else state[i * n_dir + d]
                ud = u if d == 0 else u.flip(1)
                yd, last = head(ud, s, self.mode)
                y = y + (yd if d == 0 else yd.flip(1))
                new.append(last)
        out = self.out_proj(y * F.silu(z))
        return out, (new if (use_cache or state is not None) else None)
