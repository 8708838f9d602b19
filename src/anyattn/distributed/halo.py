"""Sharded neighborhood attention by halo exchange (METHODS.md "Halo exchange"; NATTEN semantics as in
`anyattn.neighborhood`).

The grid `(n_1, ..., n_m)` is sharded along its first axis, contiguous: rank r holds rows
`[r n, (r + 1) n)`, n = n_1 / W. The window rule is evaluated in global coordinates
(`masks.neighborhood.window`), so windows shift only at the global borders. Each rank needs a *slab* of
key rows `[start, end)` around its own: every key row its queries' windows touch, and the rows of
their stride leaders (the rule places a window from its leader). `start` is aligned down to a multiple
of `dilation * stride` (rows): the slab then has the global grid's dilation groups and stride blocks,
and the unchanged engine run on the slab (queries zero-padded over the halo rows, those outputs
dropped) reproduces the global windows of the rank's rows exactly: a clamp at a slab edge happens only
where the slab edge is the grid's edge. The halo rows `start..r n` and `(r+1) n..end` come from the
two neighbours (an error when a halo is larger than a neighbour's shard). Backward: the halo rows'
key/value gradients are sent back to their owners and added there.

Cost over the local engine: the halo rows' queries, `(left + right halo) / n` extra work; traffic per
rank and direction: halo rows x `(D + D_v)` per K/V head, both in forward and backward.
"""
from __future__ import annotations

import math

import torch

from ..masks.neighborhood import group_sizes, normalize_args, window
from ..softmax.neighborhood import neighborhood as local_neighborhood
from .comm import as_comm
from .layout import Layout, check_layout

TAG_TO_NEXT, TAG_TO_PREV = 21, 22


def slab(rank: int, rows: int, n: int, k: int, d: int, s: int, causal: bool) -> tuple[int, int]:
    """Key rows `[start, end)` rank `rank` (owning rows `[rank * rows, (rank + 1) * rows)` of an axis of n)
    needs, with start aligned to `d * s` and at least `k * d` rows (the engine's minimum size)."""
    a = rank * rows
    x = torch.arange(a, a + rows)  # host: slab bounds are plain integers
    g, c = x % d, x // d
    ng = group_sizes(n, d, g)
    lo, hi = window(c, ng, k, s, causal)
    lead = torch.minimum((c // s) * s + ((s - 1) if causal else s // 2), ng - 1)
    first = int(torch.minimum(lo, lead).mul(d).add(g).min())
    last = int(torch.maximum(hi, lead).mul(d).add(g).max())
    step = d * s
    start = (first // step) * step
    end = max(last + 1, min(n, start + k * d))
    if end - start < k * d:
        start = max(0, ((end - k * d) // step) * step)
    return start, end


class _HaloExchange(torch.autograd.Function):
    """(B, H, rows, ..., C) -> (B, H, left + rows + right, ..., C): the neighbours' halo rows around
    this rank's; backward sends the halo rows' gradients home and adds the ones received."""

    @staticmethod
    def forward(ctx, comm, x, halos):
        ctx.comm, ctx.halos = comm, halos
        return _exchange(comm, x, halos, forward=True)

    @staticmethod
    def backward(ctx, g):
        return None, _exchange(ctx.comm, g.contiguous(), ctx.halos, forward=False), None


def _rows_like(x, rows):
    """`(shape, dtype, device)` of `rows` rows (dim 2) of x, for `irecv`."""
    return (tuple(x.shape[:2]) + (rows,) + tuple(x.shape[3:]), x.dtype, x.device)


def _exchange(comm, x, halos, forward):
    """halos[r] = (left, right) rows rank r needs. Forward: returns the slab; backward (x = the slab's
    gradient): returns the gradient of this rank's rows."""
    r, W = comm.rank, comm.world_size
    left, right = halos[r]
    if forward:
        rows = x.shape[2]
        to_next = halos[r + 1][0] if r + 1 < W else 0  # rows the next rank needs from my end
        to_prev = halos[r - 1][1] if r > 0 else 0  # rows the previous rank needs from my start
        sends = [comm.isend(x[:, :, rows - to_next:], r + 1, TAG_TO_NEXT) if to_next else None,
                 comm.isend(x[:, :, :to_prev], r - 1, TAG_TO_PREV) if to_prev else None]
        recv_l = comm.irecv(_rows_like(x, left), r - 1, TAG_TO_NEXT) if left else None
        recv_r = comm.irecv(_rows_like(x, right), r + 1, TAG_TO_PREV) if right else None
        parts = ([recv_l.wait()] if recv_l else []) + [x] + ([recv_r.wait()] if recv_r else [])
        for s_ in sends:
            if s_ is not None:
                s_.wait()
        return torch.cat(parts, 2) if len(parts) > 1 else x
    # backward: x is the slab gradient (left + rows + right)
    rows = x.shape[2] - left - right
    own = x[:, :, left:left + rows].clone()
    sends = [comm.isend(x[:, :, :left], r - 1, TAG_TO_PREV) if left else None,
             comm.isend(x[:, :, left + rows:], r + 1, TAG_TO_NEXT) if right else None]
    from_next = halos[r + 1][0] if r + 1 < W else 0
    from_prev = halos[r - 1][1] if r > 0 else 0
    if from_next:
        own[:, :, rows - from_next:] += comm.irecv(_rows_like(x, from_next), r + 1, TAG_TO_PREV).wait()
    if from_prev:
        own[:, :, :from_prev] += comm.irecv(_rows_like(x, from_prev), r - 1, TAG_TO_NEXT).wait()
    for s_ in sends:
        if s_ is not None:
            s_.wait()
    return own


def neighborhood(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, *, layout, group=None,
                 spatial_shape=None, scale=None, return_lse=False):
    """Neighborhood attention (NATTEN semantics, `anyattn.neighborhood`) of a grid sharded along its first
    spatial axis over the ranks of `group`.

    q `(B, H, n, *rest, D)` (this rank's n rows of the first axis), k `(B, H_kv, n, *rest, D)`,
    v `(B, H_kv, n, *rest, D_v)`; or flattened `(B, H, n * prod(rest), D)` with `spatial_shape` the global
    grid. layout: a "contiguous" `ad.Layout` over the first axis (`n_global` = its size) or over the
    flattened grid (`n_global` = prod(spatial), shards of whole rows). kernel_size, dilation, stride,
    is_causal: as in `anyattn.neighborhood`, per axis, on the global grid. Returns out shaped like q with
    D_v (and lse `(B, H, n, *rest)` or flattened when `return_lse`). Differentiable in q, k, v.
    Raises ValueError when a rank's halo is larger than a neighbour's shard (use fewer ranks).
    """
    comm = as_comm(group)
    W, r = comm.world_size, comm.rank
    if not isinstance(layout, Layout) or layout.kind != "contiguous":
        raise ValueError(f"layout must be a 'contiguous' anyattn.distributed.Layout (shards of whole rows), "
                         f"got {layout!r}")
    check_layout(layout, W)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    flat = spatial_shape is not None and q.dim() == 4
    if spatial_shape is not None:
        spatial = (spatial_shape,) if isinstance(spatial_shape, int) else tuple(spatial_shape)
        if not spatial or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in spatial):
            raise ValueError(f"spatial_shape must be a tuple of positive ints, got {spatial_shape!r}")
    else:
        if q.dim() < 4:
            raise ValueError(f"q must have shape (B, H, n, *rest, D), got {tuple(q.shape)}")
        spatial = (q.shape[2] * W,) + tuple(q.shape[3:-1])
    n1, rest = spatial[0], spatial[1:]
    if layout.n_global == math.prod(spatial) and layout.n_global != n1:
        if n1 % W:
            raise ValueError(f"the first spatial axis ({n1}) must split over W = {W} ranks in whole rows")
    elif layout.n_global != n1:
        raise ValueError(f"layout.n_global = {layout.n_global} must be the first spatial axis size {n1} or the "
                         f"grid size {math.prod(spatial)}")
    rows = n1 // W
    local = (rows,) + rest
    if flat:
        if q.shape[2] != math.prod(local):
            raise ValueError(f"flattened q must hold n_local = {rows} rows x {math.prod(rest)} = {math.prod(local)} "
                             f"positions, got {q.shape[2]}")
        q, k, v = (x.reshape(x.shape[0], x.shape[1], *local, x.shape[-1]) for x in (q, k, v))
    for name, x in (("q", q), ("k", k), ("v", v)):
        if tuple(x.shape[2:-1]) != local:
            raise ValueError(f"{name} must hold this rank's rows of the grid, spatial shape {local}, got "
                             f"{tuple(x.shape[2:-1])}")
    ks, ds, ss, cs = normalize_args(spatial, kernel_size, dilation, stride, is_causal)
    halos = []
    for s_ in range(W):
        start, end = slab(s_, rows, n1, ks[0], ds[0], ss[0], cs[0])
        halos.append((s_ * rows - start, end - (s_ + 1) * rows))
    left, right = halos[r]
    worst = max(max(h) for h in halos)
    if worst > rows:
        raise ValueError(f"the halo ({worst} rows of axis 0 for kernel_size={ks[0]}, dilation={ds[0]}, "
                         f"stride={ss[0]}) is larger than a neighbour's shard ({rows} rows): use fewer ranks "
                         f"(at most {n1 // worst}) or a smaller kernel")
    D = k.shape[-1]
    if W > 1:
        kv = _HaloExchange.apply(comm, torch.cat([k, v], -1).contiguous(), tuple(halos))
        k_s, v_s = kv[..., :D], kv[..., D:]
        pad = [0, 0] * (len(rest) + 1) + [left, right]
        q_s = torch.nn.functional.pad(q, pad)
    else:
        q_s, k_s, v_s = q, k, v
    res = local_neighborhood(q_s, k_s, v_s, ks, ds, ss, cs, scale=scale, return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    out = out[:, :, left:left + rows]
    if lse is not None:
        lse = lse[:, :, left:left + rows]
    if flat:
        out = out.flatten(2, -2)
        lse = lse.flatten(2) if lse is not None else None
    return (out, lse) if return_lse else out
