"""How a sequence of `n_global` tokens is split over W ranks (METHODS.md "Context parallelism").

- "contiguous": rank r holds tokens `[r n, (r + 1) n)`, n = n_global / W;
- "zigzag": the sequence is cut in 2W chunks of c = n_global / (2W); rank r holds chunks r and 2W-1-r
  (so under a causal mask every rank has the same work: ring attention's load balance);
- "stripe": rank r holds tokens r, r + W, r + 2W, ... (Striped Attention, Brandon et al. 2023).

Local rows are in increasing global order on every layout. `positions(rank)` gives the global index of
each local row (for RoPE, masks and biases); `segments(rank)` gives them as arithmetic runs
`Segment(start, count, step, local_start)`, which is what the attention planners use.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

KINDS = ("contiguous", "zigzag", "stripe")


class Segment(NamedTuple):
    """Local rows `[local_start, local_start + count)` hold global positions `start + step * i`."""

    start: int
    count: int
    step: int
    local_start: int

    def global_at(self, i: int) -> int:
        return self.start + self.step * i


class Layout:
    """A split of `n_global` positions over `world_size` ranks; kind in "contiguous", "zigzag", "stripe".

    n_global must be divisible by W (contiguous, stripe) or by 2W (zigzag)."""

    def __init__(self, kind: str, world_size: int, n_global: int):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, val in (("world_size", world_size), ("n_global", n_global)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be an int >= 1, got {val!r}")
        parts = 2 * world_size if kind == "zigzag" else world_size
        if n_global % parts != 0:
            raise ValueError(f"Layout({kind!r}) needs n_global divisible by {'2W' if kind == 'zigzag' else 'W'} = "
                             f"{parts} (W = {world_size}), got n_global = {n_global}")
        self.kind, self.world_size, self.n_global = kind, world_size, n_global
        self.n_local = n_global // world_size
        self.chunk = n_global // parts  # zigzag: chunk length; else the shard length

    def _check_rank(self, rank) -> int:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an int in [0, {self.world_size}), got {rank!r}")
        return rank

    def segments(self, rank: int) -> list[Segment]:
        """The local rows of `rank` as arithmetic runs of global positions, in local order."""
        r, W = self._check_rank(rank), self.world_size
        if self.kind == "contiguous":
            return [Segment(r * self.n_local, self.n_local, 1, 0)]
        if self.kind == "zigzag":
            c = self.chunk
            return [Segment(r * c, c, 1, 0), Segment((2 * W - 1 - r) * c, c, 1, c)]
        return [Segment(r, self.n_local, W, 0)]

    def positions(self, rank: int, device=None) -> torch.Tensor:
        """Global index of each local row of `rank`: LongTensor `(n_local,)`, increasing."""
        return torch.cat([torch.arange(s.start, s.start + s.step * s.count, s.step, device=device)
                          for s in self.segments(rank)])

    def __eq__(self, other):
        return isinstance(other, Layout) and (self.kind, self.world_size, self.n_global) == \
            (other.kind, other.world_size, other.n_global)

    def __hash__(self):
        return hash((self.kind, self.world_size, self.n_global))

    def __repr__(self):
        return f"Layout({self.kind!r}, world_size={self.world_size}, n_global={self.n_global})"


def check_layout(layout, world_size: int | None = None, n_local: int | None = None, what: str = "x") -> Layout:
    """Validate the `layout=` argument against the group's size and a local sequence length."""
    if not isinstance(layout, Layout):
        raise TypeError(f"layout must be an anyattn.distributed.Layout, got {type(layout).__name__}")
    if world_size is not None and layout.world_size != world_size:
        raise ValueError(f"layout.world_size = {layout.world_size} does not match the group's size {world_size}")
    if n_local is not None and n_local != layout.n_local:
        raise ValueError(f"{what} has {n_local} local positions, but {layout!r} gives each rank "
                         f"n_local = {layout.n_local}")
    return layout


def _dim(x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    return dim % x.dim()


def shard(x: torch.Tensor, layout: Layout, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank `rank`'s rows of the global tensor `x` along `dim` (a new contiguous tensor; differentiable)."""
    d = _dim(x, dim)
    check_layout(layout)
    if x.shape[d] != layout.n_global:
        raise ValueError(f"x.shape[{dim}] = {x.shape[d]} must equal layout.n_global = {layout.n_global}")
    segs = layout.segments(rank)
    if layout.kind == "stripe":
        return x.index_select(d, layout.positions(rank, x.device)).contiguous()
    return torch.cat([x.narrow(d, s.start, s.count) for s in segs], dim=d).contiguous()


def unshard(x_local: torch.Tensor, layout: Layout, group=None, dim: int = 2) -> torch.Tensor:
    """The global tensor from every rank's rows: one `all_gather`, then the rows put in global order.
    Differentiable (each rank's gradient for rank r's rows goes back to rank r and is summed there)."""
    from .comm import as_comm
    comm = as_comm(group)
    d = _dim(x_local, dim)
    check_layout(layout, comm.world_size, x_local.shape[d], "x_local")
    parts = comm.all_gather(x_local.contiguous())
    if layout.kind == "contiguous":
        return torch.cat(parts, dim=d)
    if layout.kind == "zigzag":
        c = layout.chunk
        firsts = [p.narrow(d, 0, c) for p in parts]
        seconds = [p.narrow(d, c, c) for p in reversed(parts)]
        return torch.cat(firsts + seconds, dim=d)
    # stripe: (..., W, n_local, ...) -> (..., n_local, W, ...) flattened: global row i*W + r.
    return torch.stack(parts, dim=d + 1).flatten(d, d + 1)
