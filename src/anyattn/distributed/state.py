"""State passing over sequence shards: per-segment affine maps and their prefix fold.

Every state-passing op of anyattn (the linear family, MoM, SSD, selective scan) maps the state
entering a segment of the sequence affinely to the state leaving it, and its outputs are affine in
the entering state:

    S_out = M S_in + S_ext,        o = o_0 + corr(S_in)

`S_ext` is the final state from a zero state, `M` the segment's transition: the identity (linear
attention), a product of decays (retention, GLA, SSD, selective scan: one number per state row or
entry), or a product of `D_k x D_k` transitions (delta rules). `Affine` holds one map; `fold` chains
the maps of all segments in sequence order (in the states' dtype: fp32, fp64 for fp64 inputs), giving
each segment its entering state and the final state. `runs` cuts a rank's rows into the
contiguous runs of global positions the fold works on.
"""
from __future__ import annotations

import torch

KINDS = (None, "scale", "matrix")


class Affine:
    """`S_out = M S_in + S_ext`. kind None: M = I (M is None); "scale": `M * S` with M broadcastable
    to S (stored in its broadcast shape, e.g. `(B, H, 1, 1)` or `(B, H, D_k, 1)`); "matrix":
    `M @ S` with M `(..., D_k, D_k)` and S `(..., D_k, D_v)`."""

    def __init__(self, kind, M, S_ext):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind, self.M, self.S_ext = kind, M, S_ext

    def apply(self, S):
        if self.kind is None:
            return S + self.S_ext
        if self.kind == "scale":
            return self.M * S + self.S_ext
        return self.M @ S + self.S_ext

    def pack(self) -> torch.Tensor:
        """M and S_ext flattened into one vector (what one all_gather sends)."""
        parts = [self.S_ext.reshape(-1)] if self.kind is None else [self.M.reshape(-1), self.S_ext.reshape(-1)]
        return torch.cat(parts)

    def numel(self) -> int:
        return self.S_ext.numel() + (0 if self.M is None else self.M.numel())

    @staticmethod
    def unpack(vec, like: "Affine") -> "Affine":
        """The inverse of `pack`, with `like`'s kind and shapes."""
        if like.kind is None:
            return Affine(None, None, vec.view(like.S_ext.shape))
        m = like.M.numel()
        return Affine(like.kind, vec[:m].view(like.M.shape), vec[m:].view(like.S_ext.shape))

    @staticmethod
    def constant(S_out, like: "Affine | None" = None) -> "Affine":
        """The map of the segment that starts the sequence: its S_out is known (the initial state is
        already applied), so M is zero (packed to `like`'s shape so every segment packs the same size)."""
        if like is None or like.kind is None:
            return Affine(None, None, S_out)
        return Affine(like.kind, torch.zeros_like(like.M), S_out)


def fold(maps, first_is_constant: bool = True):
    """Chain maps given in sequence order: returns `(S_in of each map, final state)`. The first map's
    S_out is taken as given (`Affine.constant`) when `first_is_constant`, else the chain starts from 0."""
    S = None
    entering = []
    for i, m in enumerate(maps):
        entering.append(S)
        if i == 0 and first_is_constant:
            S = m.S_ext
        elif S is None:
            S = m.S_ext
        else:
            S = m.apply(S)
    return entering, S


def runs(layout, rank: int) -> list[tuple[int, int, int]]:
    """The rank's local rows as contiguous runs of global positions, in local order: `(local_start,
    length, global_start)` (one run for "contiguous", two for "zigzag", one per row for "stripe")."""
    out = []
    for s in layout.segments(rank):
        if s.step == 1 or s.count == 1:
            out.append((s.local_start, s.count, s.start))
        else:
            out += [(s.local_start + i, 1, s.start + s.step * i) for i in range(s.count)]
    return out
