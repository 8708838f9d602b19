"""Halo of a short causal convolution over sequence shards: `ad.causal_conv_halo`, `ad.causal_conv`.

A causal convolution of kernel k needs, for the first row of each contiguous run of a rank's rows,
the k - 1 rows before it in global order. "contiguous": rank r gets the last k - 1 rows of rank r - 1
(one ring step, zeros on rank 0). "zigzag" (rank r holds chunks r and 2W - 1 - r): chunk r's halo
comes from rank r - 1's first chunk (ring step forward), chunk 2W - 1 - r's from rank r + 1's second
chunk (ring step backward; rank W - 1 takes the tail of its own first chunk). The exchanges are `Comm.
isend` / `recv` in an autograd Function: the halo's gradient travels back to the rows' owners. Each
exchange has its own tag (`next_tag`).
"""
from __future__ import annotations

import torch

from .comm import as_comm
from .layout import check_layout

_TAG_BASE = 1 << 20


def _tail(x, dim, h):
    return x.narrow(dim, x.shape[dim] - h, h)


def next_tag(comm) -> int:
    """A fresh point-to-point tag for one exchange (every rank calls in the same order, so they agree).
    Distinct tags keep messages apart when autograd runs the backward of independent exchanges in a
    different order on different ranks."""
    n = getattr(comm, "_anyattn_p2p_seq", 0)
    comm._anyattn_p2p_seq = n + 1
    return _TAG_BASE + n % _TAG_BASE


class _Shift(torch.autograd.Function):
    """y = the tensor rank `src` sends (zeros when src is None); this rank's x goes to `dst` (none when
    None). Backward: the gradient of y goes back to src, x's gradient comes from dst."""

    @staticmethod
    def forward(ctx, comm, x, dst, src, tag):
        ctx.comm, ctx.dst, ctx.src, ctx.tag = comm, dst, src, tag
        work = None if dst is None else comm.isend(x, dst, tag)
        y = torch.zeros_like(x) if src is None else comm.recv(x, src, tag)
        if work is not None:
            work.wait()
        return y

    @staticmethod
    def backward(ctx, g):
        comm = ctx.comm
        work = None if ctx.src is None else comm.isend(g.contiguous(), ctx.src, ctx.tag)
        gx = None if ctx.dst is None else comm.recv(g, ctx.dst, ctx.tag)
        if work is not None:
            work.wait()
        return None, gx, None, None, None


def causal_conv_halo(x: torch.Tensor, kernel_size: int, *, layout, group=None, dim: int = 1) -> list:
    """The halos of this rank's rows for a causal convolution of `kernel_size` taps along `dim`.

    x: this rank's rows (any shape; the sequence along `dim`, e.g. `(B, n_local, C)` with dim=1 or
    `(B, C, n_local)` with dim=-1). Returns one tensor per contiguous run of the rank's rows (one for
    "contiguous", two for "zigzag", in local order), each shaped like x with `kernel_size - 1` rows
    along `dim`: the rows before the run in global order, zeros before position 0. Every rank must call
    it (the exchange is collective). Raises ValueError for the "stripe" layout or when a run is shorter
    than `kernel_size - 1`."""
    comm = as_comm(group)
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
        raise ValueError(f"kernel_size must be an int >= 1, got {kernel_size!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be in [-{x.dim()}, {x.dim()}) for x of shape {tuple(x.shape)}, got {dim}")
    dim %= x.dim()
    check_layout(layout, comm.world_size, x.shape[dim], "x")
    if layout.kind == "stripe":
        raise ValueError("causal_conv_halo supports the 'contiguous' and 'zigzag' layouts (a 'stripe' rank holds "
                         "every W-th row: its halo is the other ranks' whole shards), got 'stripe'")
    h = kernel_size - 1
    run = layout.n_local if layout.kind == "contiguous" else layout.chunk
    if h > run:
        raise ValueError(f"kernel_size - 1 = {h} rows of halo exceed a neighbour's run of {run} rows "
                         f"({layout!r}); use fewer ranks or a longer sequence")
    rank, W = comm.rank, comm.world_size
    shape = list(x.shape)
    shape[dim] = h
    zeros = x.new_zeros(shape)
    if h == 0:
        return [zeros] * (1 if layout.kind == "contiguous" else 2)

    def step(t, forward: bool):
        """Send t one rank up (forward) or down, receive from the other side (zeros at the ends)."""
        nxt, prv = (rank + 1, rank - 1) if forward else (rank - 1, rank + 1)
        dst = nxt if 0 <= nxt < W else None
        src = prv if 0 <= prv < W else None
        return _Shift.apply(comm, t.contiguous(), dst, src, next_tag(comm))

    if layout.kind == "contiguous":
        return [step(_tail(x, dim, h), True)]
    c = layout.chunk
    first, second = x.narrow(dim, 0, c), x.narrow(dim, c, c)
    got1 = step(_tail(first, dim, h), True)
    got2 = step(_tail(second, dim, h), False)
    if rank == W - 1:     # got2 is zeros here; adding keeps the exchange in the graph (its backward must run)
        got2 = got2 + _tail(first, dim, h)
    return [got1, got2]


def causal_conv(conv, x: torch.Tensor, kernel_size: int, *, layout, group=None, dim: int = 1) -> torch.Tensor:
    """Apply `conv(x_run, halo) -> y_run` (a causal convolution given the k - 1 rows before its input,
    e.g. a layer's short convolution with its cache) to each contiguous run of this rank's rows with
    the run's halo (`causal_conv_halo`); returns the outputs concatenated along `dim`."""
    halos = causal_conv_halo(x, kernel_size, layout=layout, group=group, dim=dim)
    dim %= x.dim()
    if len(halos) == 1:
        return conv(x, halos[0])
    c = layout.chunk
    return torch.cat([conv(x.narrow(dim, i * c, c), hl) for i, hl in enumerate(halos)], dim)
