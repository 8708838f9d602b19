"""Ring attention and all-gather attention (METHODS.md "Context parallelism": Liu et al., "Ring Attention
with Blockwise Transformers for Near-Infinite Context", 2023; zig-zag balance as in ring-flash-attn).

Ring: rank r holds its queries; K/V blocks travel the ring r -> r+1 (W-1 steps). At step t rank r
attends block s = r - t, starting the next block's send/receive before the block's compute and waiting
after it (communication overlapped with compute). Partial results merge by LSE in the work dtype
(float32 for low-precision inputs). Heads are processed in passes of `kv_heads_per_pass` K/V heads,
each pass its own ring, so the travelling buffers stay small (memory O(n_local) per rank, about
`4 * block` extra bytes).

Backward (FlashAttention-style, no forward recompute): K/V travel the ring again and every rank adds
its share of each block's dK/dV, computed from its rows' final (out, lse), to an fp32 accumulator that
travels with the block; after W steps the accumulator reaches the block's owner. The travelling K/V
and accumulators use two buffers each, in turn (no allocation per step). Per rank and pass:
forward (W-1) K/V messages; backward (W-1) K/V messages plus W dK/dV messages.

All-gather: one `all_gather` of every rank's K/V (O(N) memory), the same block loop locally; in backward
each block's dK/dV go home with one `all_to_all` (the gloo-safe reduce-scatter) in the work dtype.
"""
from __future__ import annotations

import torch

from .blocks import Problem, merge_rows

TAG_FWD, TAG_BWD_KV, TAG_BWD_ACC = 11, 12, 13
RING_PASS_BYTES = 4 << 20  # target size of one travelling K/V block (sets kv_heads_per_pass)


def heads_per_pass(B: int, H_kv: int, n_local: int, D: int, D_v: int, element_size: int) -> int:
    """K/V heads per ring pass: as many as keep one travelling block under RING_PASS_BYTES (at least 1)."""
    per_head = B * n_local * (D + D_v) * element_size
    return max(1, min(H_kv, RING_PASS_BYTES // max(per_head, 1)))


def _passes(H_kv: int, per: int):
    return [(g, min(g + per, H_kv)) for g in range(0, H_kv, per)]


def _ring(comm, kv, tag):
    """Yield `(source rank, block)` for t = 0..W-1, overlapping the next block's transfer with the
    consumer's work on the current one (two buffers, used in turn: no allocation per step)."""
    W, r = comm.world_size, comm.rank
    nxt, prv = (r + 1) % W, (r - 1) % W
    spare = torch.empty_like(kv) if W > 1 else None
    for t in range(W):
        req = comm.isendrecv(kv, nxt, kv, prv, tag, out=spare) if t < W - 1 else None
        yield (r - t) % W, kv
        if req is not None:
            kv, spare = req.wait(), kv


def _order(comm):
    return [(comm.rank - t) % comm.world_size for t in range(comm.world_size)]


def _forward(prob: Problem, comm, algo, per, q, k, v):
    B, H, n, D = q.shape
    G, D_v, r = prob.groups, v.shape[-1], comm.rank
    work = prob.work
    out = torch.zeros(B, H, n, D_v, dtype=work, device=q.device)
    lse = torch.full((B, H, n), float("-inf"), dtype=work, device=q.device)
    qw = q.to(work)
    gathered = []
    for g0, g1 in _passes(k.shape[1], per):
        h0, h1 = g0 * G, g1 * G
        qg, og, lg = qw[:, h0:h1], out[:, h0:h1], lse[:, h0:h1]
        kv = torch.cat([k[:, g0:g1], v[:, g0:g1]], -1)
        if algo == "ring":
            blocks = _ring(comm, kv, TAG_FWD)
        else:
            parts = comm.all_gather(kv)
            gathered.append(parts)
            blocks = ((s, parts[s]) for s in _order(comm))
        touched = []  # row ranges already holding a partial result
        for s, kv_s in blocks:
            rects = prob.plan(r, s)
            if not rects:
                continue
            kw = kv_s.to(work)
            for q0, q1, o, l in prob.block_forward(rects, qg, kw[..., :D], kw[..., D:], (h0, h1)):
                first = all(b <= q0 or a >= q1 for a, b in touched)
                merge_rows(og, lg, q0, q1, o, l, first)  # rows partly touched: merge (exact for untouched)
                touched.append((q0, q1))
    return out, lse, gathered


def _backward(prob: Problem, comm, algo, per, q, k, v, out, lse, dout, dlse, gathered, n_bias):
    B, H, n, D = q.shape
    G, D_v, r, W = prob.groups, v.shape[-1], comm.rank, comm.world_size
    work = prob.work
    qw = q.to(work)
    dout = torch.zeros_like(out) if dout is None else dout.to(work)
    dq = torch.zeros_like(qw)
    dk = torch.zeros(k.shape, dtype=work, device=k.device)
    dv = torch.zeros(v.shape, dtype=work, device=v.device)
    dbias = [None] * n_bias
    nxt, prv = (r + 1) % W, (r - 1) % W
    for i, (g0, g1) in enumerate(_passes(k.shape[1], per)):
        h0, h1 = g0 * G, g1 * G
        args = (qw[:, h0:h1], out[:, h0:h1], lse[:, h0:h1], dout[:, h0:h1],
                None if dlse is None else dlse[:, h0:h1])
        shape = (B, g1 - g0, n, D + D_v)
        if algo == "ring":
            kv = torch.cat([k[:, g0:g1], v[:, g0:g1]], -1)
            acc, spare = torch.zeros(shape, dtype=work, device=q.device), torch.empty(shape, dtype=work,
                                                                                      device=q.device)
            acc_req = None
            for s, kv_s in _ring(comm, kv, TAG_BWD_KV):
                if acc_req is not None:  # the accumulator of block s, from the previous rank
                    acc, spare = acc_req.wait(), acc
                _block_grads(prob, r, s, kv_s, args, (h0, h1), dq[:, h0:h1], acc, dbias)
                acc_req = comm.isendrecv(acc, nxt, acc, prv, TAG_BWD_ACC, out=spare)
            home = acc_req.wait()  # after W hops the accumulator of my own block is back
        else:
            parts = gathered[i]
            contrib = torch.zeros((W,) + shape, dtype=work, device=q.device)
            for s in _order(comm):
                _block_grads(prob, r, s, parts[s], args, (h0, h1), dq[:, h0:h1], contrib[s], dbias)
            home = comm.all_to_all(contrib, 0, 0).view((W,) + shape).sum(0)
        dk[:, g0:g1] = home[..., :D]
        dv[:, g0:g1] = home[..., D:]
    return dq, dk, dv, dbias


def _block_grads(prob, r, s, kv_s, args, heads, dq, dkv, dbias):
    rects = prob.plan(r, s)
    if not rects:
        return
    D = prob.D
    kw = kv_s.to(prob.work)
    qg, og, lg, dog, dlg = args
    prob.block_backward(rects, qg, kw[..., :D], kw[..., D:], og, lg, dog, dlg, heads, dq, dkv, dbias)


class KVBlockAttention(torch.autograd.Function):
    """Ring (`algo="ring"`) or all-gather (`algo="allgather"`) attention of the local queries against
    every rank's K/V. Returns out (q's dtype) and lse (work dtype)."""

    @staticmethod
    def forward(ctx, prob, comm, algo, per, q, k, v, *bias_tensors):
        out, lse, gathered = _forward(prob, comm, algo, per, q, k, v)
        ctx.prob, ctx.comm, ctx.algo, ctx.per, ctx.gathered = prob, comm, algo, per, gathered
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.n_bias = len(bias_tensors)
        ctx.set_materialize_grads(False)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, dbias = _backward(ctx.prob, ctx.comm, ctx.algo, ctx.per, q, k, v, out, lse, dout, dlse,
                                      ctx.gathered, ctx.n_bias)
        ctx.gathered = None
        bias_tensors = ctx.prob.bias.tensors() if ctx.n_bias else ()
        dbias = [None if g is None else g.to(t.dtype) for g, t in zip(dbias, bias_tensors)]
        return (None, None, None, None, dq.to(ctx.dtypes[0]), dk.to(ctx.dtypes[1]), dv.to(ctx.dtypes[2]), *dbias)
