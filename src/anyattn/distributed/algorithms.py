"""The three ways to run a state-passing op over sequence shards (METHODS.md "State passing").

Each takes a `Problem` (`problems.py`) holding this rank's rows, the `Layout`, a `Comm` and the
initial state (used on rank 0 only), and returns `(o, final_state)` with the final state on every
rank (None unless `want_final`):

* `summary`: every contiguous run of local rows is summarized by its affine map `S_out = M S_in +
  S_ext` (rank 0's first run simply runs with the initial state); one `all_gather` of the packed maps;
  every rank folds them in sequence order (states' dtype: fp32, fp64 for fp64 inputs) and finishes
  its outputs from its entering state. Traffic per rank: (W - 1) maps, independent of N. Any layout
  with few runs per rank (contiguous, zigzag).
* `ulysses`: all-to-all sequence <-> heads (DeepSpeed-Ulysses, Jacobs et al. 2023): each rank runs the
  unsharded op on H / W of the state heads over the whole sequence, then the outputs go back. Any
  layout (rows are put in global order after the exchange). Needs every head count divisible by W.
* `pipeline`: the state passes rank to rank in sequence order, in blocks of (batch rows, heads), so
  rank r works on block p while rank r + 1 works on block p - 1: time about (P + W - 1) / P of a
  shard's run. Backward runs the same pipeline in reverse (state gradients travel r + 1 -> r).
  For ops whose engine splits in phases (the delta rules: `Problem.phased`) every rank first runs the
  state-independent phase for all its heads at once, and only the state scans run in blocks
  (`_PhasedPipeline`): about 0.6 + 0.4 (P + W - 1) / P of a shard's run. Contiguous layout only.

Gradients are exact: `summary` and `ulysses` are autograd through the single-process ops and the
differentiable collectives of `Comm`; `pipeline` is one autograd Function whose backward differentiates
each block's graph kept from the forward. Collectives whose result a rank does not use are tied into
its outputs' graph (`tie`), so that every rank takes part in every backward collective.
"""
from __future__ import annotations

import torch

from .conv_halo import next_tag
from .state import Affine, fold, runs


# ------------------------------------------------------------------------------------------- summary
def summary(problem, layout, comm, S0, want_final: bool = True):
    W, rank = comm.world_size, comm.rank
    a = problem.values()
    mine = runs(layout, rank)
    finished, vecs = [], []
    for lo, n, g0 in mine:
        sub = problem.slice_seq(a, lo, n)
        kind, mshape = problem.map_shape(sub)
        if g0 == 0:
            o, S = problem.run(sub, S0)
            M = None if kind is None else S.new_zeros(mshape)
            amap = Affine(kind, M, S)
            finished.append(o)
        else:
            amap, finish = problem.local_map(sub)
            finished.append(finish)
        vecs.append(amap.pack())
    template = amap
    counts = [len(runs(layout, r)) for r in range(W)]
    size = template.numel()
    vec = torch.cat(vecs)
    if len(mine) < max(counts):
        vec = torch.cat([vec, vec.new_zeros((max(counts) - len(mine)) * size)])
    gathered = comm.all_gather(vec) if W > 1 else [vec]
    everyone = []                                       # (global_start, rank, index, Affine)
    for r in range(W):
        for j, (_, _, g0) in enumerate(runs(layout, r)):
            everyone.append((g0, r, j, Affine.unpack(gathered[r][j * size:(j + 1) * size], template)))
    everyone.sort(key=lambda t: t[0])
    entering, final = fold([t[3] for t in everyone], first_is_constant=True)
    s_in = {(r, j): s for (_, r, j, _), s in zip(everyone, entering)}
    outs = [f if isinstance(f, torch.Tensor) else f(s_in[(rank, j)]) for j, f in enumerate(finished)]
    o = outs[0] if len(outs) == 1 else torch.cat(outs, problem.out_seq)
    if all(isinstance(f, torch.Tensor) for f in finished) and W > 1:
        o = tie(o, *gathered)            # rank 0 reads no other map, but its all_gather must run backward too
    return o, (final if want_final else None)


class _Tie(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o, *others):
        ctx.metas = [(x.shape, x.dtype, x.device) for x in others]
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        return (g,) + tuple(torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.metas)


def tie(o, *others):
    """o unchanged, with `others` attached to its graph (zero gradients): a collective's backward must run
    on every rank, also on ranks whose outputs do not depend on its result."""
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in others):
        return o
    return _Tie.apply(o, *others)


# ------------------------------------------------------------------------------------------- ulysses
def check_heads(problem, W: int) -> str | None:
    """Why Ulysses / the pipeline cannot split `problem`'s heads in W blocks (None: they can)."""
    sizes = dict(problem.head_sizes())
    sizes["state"] = problem.heads()
    grouped = {n for n, a in problem.args.items() if a.groups}
    names = [n for n, h in sizes.items() if h % W and not (n in grouped and W % h == 0)]
    bad = sorted({sizes[n] for n in names})
    if bad:
        return f"the head (channel) counts {bad} of {names} must be divisible by W = {W}"
    return None


def _global_order(layout):
    """Global position of each row of the rank-ordered concatenation, and its inverse (None, None when
    that is already the global order)."""
    order = torch.cat([layout.positions(r) for r in range(layout.world_size)])
    if layout.kind == "contiguous":
        return None, None
    return order, torch.argsort(order)


def ulysses(problem, layout, comm, S0, want_final: bool = True):
    W, rank = comm.world_size, comm.rank
    why = check_heads(problem, W)
    if why is not None:
        raise ValueError(f"algo='ulysses' splits heads over the {W} ranks: {why}")
    order, inv = _global_order(layout)
    a = {}
    for name, arg in problem.args.items():
        x = arg.value
        if arg.seq is None:
            if arg.head is not None:
                h = x.shape[arg.head] // W
                x = x.narrow(arg.head, rank * h, h)
        else:
            if arg.head is None:
                x = torch.cat(comm.all_gather(x.contiguous()), arg.seq)
            elif x.shape[arg.head] % W:       # fewer groups than ranks: every rank takes its heads' group
                h = x.shape[arg.head]
                x = torch.cat(comm.all_gather(x.contiguous()), arg.seq).narrow(arg.head, rank // (W // h), 1)
            else:
                x = comm.all_to_all(x, arg.head, arg.seq)
            if inv is not None:
                x = x.index_select(arg.seq, inv.to(x.device))
        a[name] = x
    S_in = None
    if S0 is not None:
        S_all = comm.broadcast(S0, 0)
        h = S_all.shape[problem.state_head] // W
        S_in = S_all.narrow(problem.state_head, rank * h, h)
    o, S = problem.run(a, S_in)
    if order is not None:
        o = o.index_select(problem.out_seq, order.to(o.device))
    o = comm.all_to_all(o, problem.out_seq, problem.out_head)
    final = None
    if want_final:
        final = torch.cat(comm.all_gather(S.contiguous()), problem.state_head)
        o = tie(o, final)                # its backward runs on every rank, used there or not
    return o, final


# ------------------------------------------------------------------------------------------ pipeline
def pipeline_blocks(problem, parts: int):
    """`parts` blocks `(b0, nb, part, nparts)`: head blocks first (as many as divide every head count),
    then batch rows."""
    B = problem.state_shape(problem.values())[0]
    heads = [problem.heads()] + list(problem.head_sizes().values())
    hp = max(d for d in range(1, parts + 1) if all(h % d == 0 for h in heads))
    bp = max(d for d in range(1, max(1, parts // hp) + 1) if B % d == 0)
    nb = B // bp
    return [(i * nb, nb, p, hp) for i in range(bp) for p in range(hp)]


def pipeline(problem, layout, comm, S0, want_final: bool = True, parts: int = 8):
    if layout.kind != "contiguous":
        raise ValueError(f"algo='pipeline' passes the state rank to rank in sequence order and needs the "
                         f"'contiguous' layout, got {layout.kind!r} (use algo='summary' or 'ulysses')")
    names = list(problem.args)
    values = [problem.args[n].value for n in names]
    if getattr(problem, "phased", False):
        units = problem.state_shape(problem.values())[0] * problem.heads()
        P = max(d for d in range(1, parts + 1) if units % d == 0)
        blocks = [slice(i * units // P, (i + 1) * units // P) for i in range(P)]
        return _PhasedPipeline.apply(problem, comm, (blocks, next_tag(comm)), want_final, names, S0, *values)
    blocks = pipeline_blocks(problem, parts)
    return _Pipeline.apply(problem, comm, (blocks, next_tag(comm)), want_final, names, S0, *values)


def _block_view(x, block, dim):
    """The part of `x` (batch at dim 0, heads at `dim`) that `block` covers (a view)."""
    b0, nb, part, nparts = block
    x = x.narrow(0, b0, nb)
    size = x.shape[dim] // nparts
    return x.narrow(dim, part * size, size)


class _Pipeline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, problem, comm, plan, want_final, names, S0, *values):
        rank, W = comm.rank, comm.world_size
        blocks, tag = plan
        needs = ctx.needs_input_grad[6:]
        full = dict(zip(names, (v.detach() for v in values)))
        s0_grad = S0 is not None and ctx.needs_input_grad[5]
        any_grad = any(needs) or s0_grad
        state_shape = problem.state_shape(full)
        device = values[0].device
        graphs, sends = [], []
        o_full = S_full = None
        for block in blocks:
            sub = problem.slice_block(full, *block)
            leaves = {n: x.detach().requires_grad_(needs[names.index(n)]) for n, x in sub.items()}
            if rank > 0:
                S_in = comm.recv((problem.state_shape(sub), problem.state_dtype(), device), rank - 1, tag)
                S_in.requires_grad_(any_grad)
            elif S0 is not None:
                S_in = _block_view(S0.detach(), block, problem.state_head).detach().requires_grad_(s0_grad)
            else:
                S_in = None
            with torch.enable_grad():
                o, S = problem.run(leaves, S_in)
            if rank < W - 1:
                sends.append(comm.isend(S.detach(), rank + 1, tag))
            if o_full is None:
                shape = list(o.shape)
                shape[0] = state_shape[0]
                shape[problem.out_head] *= block[3]
                o_full, S_full = o.new_empty(shape), S.new_empty(state_shape)
            _block_view(o_full, block, problem.out_head).copy_(o.detach())
            _block_view(S_full, block, problem.state_head).copy_(S.detach())
            graphs.append((leaves, S_in, o, S))
        for w in sends:
            w.wait()
        ctx.problem, ctx.comm, ctx.blocks, ctx.want_final, ctx.names = problem, comm, blocks, want_final, names
        ctx.graphs, ctx.state_shape, ctx.tag = graphs, state_shape, tag
        ctx.s0_meta = None if S0 is None else (S0.shape, S0.dtype, S0.device)
        ctx.value_meta = [(v.shape, v.dtype, v.device) for v in values]
        final = comm.broadcast(S_full, W - 1) if want_final else S_full.new_zeros(0)
        return o_full, final

    @staticmethod
    def backward(ctx, do, dfinal):
        problem, comm, tag = ctx.problem, ctx.comm, ctx.tag
        rank, W = comm.rank, comm.world_size
        needs = ctx.needs_input_grad[6:]
        grads = [torch.zeros(s, dtype=dt, device=dev) if n else None for (s, dt, dev), n in zip(ctx.value_meta, needs)]
        gbuf = {n: g for n, g in zip(ctx.names, grads) if g is not None}
        dS0 = None
        if ctx.s0_meta is not None and ctx.needs_input_grad[5]:
            s, dt, dev = ctx.s0_meta
            dS0 = torch.zeros(s, dtype=dt, device=dev)
        dS_total = None
        if ctx.want_final:
            S_any = ctx.graphs[0][3]
            g = dfinal if dfinal is not None else S_any.new_zeros(ctx.state_shape)
            dS_total = comm.all_reduce(g.detach().contiguous())     # final state was broadcast: sum its cotangents
        sends = []
        for block, (leaves, S_in, o, S) in zip(ctx.blocks, ctx.graphs):
            if rank < W - 1:
                dS_out = comm.recv(S.detach(), rank + 1, tag)
            elif dS_total is not None:
                dS_out = _block_view(dS_total, block, problem.state_head)
            else:
                dS_out = torch.zeros_like(S)
            do_b = torch.zeros_like(o) if do is None else _block_view(do, block, problem.out_head)
            names = [n for n, x in leaves.items() if x.requires_grad]
            wrt = [leaves[n] for n in names]
            with_s = S_in is not None and S_in.requires_grad
            if with_s:
                wrt.append(S_in)
            got = list(torch.autograd.grad([o, S], wrt, [do_b, dS_out], allow_unused=True)) if wrt else []
            dS_in = got.pop() if with_s else None
            for n, gr in zip(names, got):
                if gr is not None:
                    problem.slice_block({n: gbuf[n]}, *block)[n].add_(gr)
            if rank > 0:
                sends.append(comm.isend(torch.zeros_like(S) if dS_in is None else dS_in, rank - 1, tag))
            elif dS0 is not None and dS_in is not None:
                _block_view(dS0, block, problem.state_head).add_(dS_in)
        for w in sends:
            w.wait()
        ctx.graphs = None
        return (None, None, None, None, None, dS0) + tuple(grads)


class _PhasedPipeline(torch.autograd.Function):
    """The pipeline for ops whose engine splits in phases (the delta rules): every rank first runs the
    state-independent phase for all its rows at once (no waiting), then scans blocks of flattened
    (batch, head) rows as their entering states arrive. Backward: the scans' backward in the same
    block order (state gradients arrive from rank r + 1), then one backward of the first phase."""

    @staticmethod
    def forward(ctx, problem, comm, plan, want_final, names, S0, *values):
        rank, W = comm.rank, comm.world_size
        blocks, tag = plan
        needs = ctx.needs_input_grad[6:]
        s0_grad = S0 is not None and ctx.needs_input_grad[5]
        any_grad = any(needs) or s0_grad
        leaves = {n: v.detach().requires_grad_(r) for n, v, r in zip(names, values, needs)}
        with torch.enable_grad():
            shape, groups = problem.prepare(leaves)
        B, H, K, V = shape[0], shape[1], shape[4], shape[5]
        sdt = problem.state_dtype()
        device = values[0].device
        S0f = None if S0 is None else S0.detach().reshape(B * H, K, V)
        graphs, sends, outs, states = [], [], [], []
        for rows in blocks:
            nrows = rows.stop - rows.start
            sub = [tuple(None if x is None else x[rows].detach().requires_grad_(x.requires_grad) for x in grp)
                   for grp in groups]
            if rank > 0:
                S_in = comm.recv(((nrows, K, V), sdt, device), rank - 1, tag).requires_grad_(any_grad)
            elif S0f is not None:
                S_in = S0f[rows].to(sdt).requires_grad_(s0_grad)
            else:
                S_in = torch.zeros(nrows, K, V, dtype=sdt, device=device)
            with torch.enable_grad():
                o, S = problem.scan(sub, S_in, None)
            if rank < W - 1:
                sends.append(comm.isend(S.detach(), rank + 1, tag))
            graphs.append((sub, S_in, o, S))
            outs.append(o.detach())
            states.append(S.detach())
        for w in sends:
            w.wait()
        o_rows = torch.cat(outs, 0).requires_grad_()
        with torch.enable_grad():
            o_full = problem.finish(shape, o_rows)
        S_full = torch.cat(states, 0).reshape(B, H, K, V)
        ctx.problem, ctx.comm, ctx.blocks, ctx.tag, ctx.want_final = problem, comm, blocks, tag, want_final
        ctx.leaves, ctx.groups, ctx.graphs, ctx.o_rows, ctx.o_full = leaves, groups, graphs, o_rows, o_full
        ctx.s0_meta = None if S0 is None else (S0.shape, S0.dtype, S0.device)
        final = comm.broadcast(S_full, W - 1) if want_final else S_full.new_zeros(0)
        return o_full.detach(), final

    @staticmethod
    def backward(ctx, do, dfinal):
        comm, tag = ctx.comm, ctx.tag
        rank, W = comm.rank, comm.world_size
        o_grad = torch.zeros_like(ctx.o_rows) if do is None else \
            torch.autograd.grad(ctx.o_full, ctx.o_rows, do)[0]
        S_last = ctx.graphs[-1][3]
        BH = ctx.o_rows.shape[0]
        dS_total = None
        if ctx.want_final:
            K, V = S_last.shape[-2:]
            g = dfinal if dfinal is not None else S_last.new_zeros(BH, K, V)
            dS_total = comm.all_reduce(g.detach().reshape(BH, K, V).contiguous())
        prep = [x for grp in ctx.groups for x in grp if x is not None and x.requires_grad]
        pgrad = {id(x): torch.zeros_like(x) for x in prep}
        dS0 = None
        if ctx.s0_meta is not None and ctx.needs_input_grad[5]:
            s, dt, dev = ctx.s0_meta
            dS0 = torch.zeros(s, dtype=dt, device=dev).reshape(BH, *s[2:])
        sends = []
        for rows, (sub, S_in, o, S) in zip(ctx.blocks, ctx.graphs):
            if rank < W - 1:
                dS_out = comm.recv(S.detach(), rank + 1, tag)
            elif dS_total is not None:
                dS_out = dS_total[rows]
            else:
                dS_out = torch.zeros_like(S)
            pairs = [(full, part) for grp_full, grp in zip(ctx.groups, sub) for full, part in zip(grp_full, grp)
                     if part is not None and part.requires_grad]
            wrt = [part for _, part in pairs]
            with_s = S_in.requires_grad
            if with_s:
                wrt.append(S_in)
            got = list(torch.autograd.grad([o, S], wrt, [o_grad[rows], dS_out], allow_unused=True)) if wrt else []
            dS_in = got.pop() if with_s else None
            for (full, _), gr in zip(pairs, got):
                if gr is not None:
                    pgrad[id(full)][rows] += gr
            if rank > 0:
                sends.append(comm.isend(torch.zeros_like(S) if dS_in is None else dS_in, rank - 1, tag))
            elif dS0 is not None and dS_in is not None:
                dS0[rows] += dS_in.to(dS0.dtype)
        for w in sends:
            w.wait()
        names = list(ctx.leaves)
        wrt = [ctx.leaves[n] for n in names if ctx.leaves[n].requires_grad]
        got = iter(torch.autograd.grad(prep, wrt, [pgrad[id(x)] for x in prep], allow_unused=True)
                   if prep and wrt else [None] * len(wrt))
        grads = [next(got) if ctx.leaves[n].requires_grad else None for n in names]
        ctx.graphs = ctx.groups = None
        return (None, None, None, None, None, None if dS0 is None else dS0.reshape(ctx.s0_meta[0])) + tuple(grads)
