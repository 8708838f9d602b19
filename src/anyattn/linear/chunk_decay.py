"""Decay engine of the linear family (linear attention, retention / Lightning, GLA): chunkwise forward
and its hand-written backward.

Per chunk n (Γ: in-chunk cumulative log-decay, scalar or per key channel; S_n: the state entering it):

    O_n     = A_n V_n + (Q_n ⊙ e^Γ) S_n          A_n: decayed gram of (Q_n, K_n), c <= r
    S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K_n)^T V_n

Backward, with dS_n the cotangent of S_n (a reverse scan: dS_n = e^{Γ_C} ⊙ dS_{n+1} + (Q_n ⊙ e^Γ)^T dO_n):

    dV = A^T dO + (e^{Γ_C - Γ} ⊙ K) dS_{n+1},   dA = dO V^T,   d(Q ⊙ e^Γ) = dO S_n^T,
    d(e^{Γ_C - Γ} ⊙ K) = V dS_{n+1}^T,  then dQ, dK through the gram's backward,
    dΓ = Σ_queries Q ⊙ dQ - K ⊙ dK, and at the chunk's last position also
         Σ_c (e^{Γ_C - Γ} ⊙ K) ⊙ d(...) + e^{Γ_C} ⊙ Σ_v S_n ⊙ dS_{n+1};
    dg = in-chunk reverse cumsum of dΓ.

Saved for backward: the scaled chunked inputs, the grams A, the states entering each chunk (one K x V
matrix per chunk) and, for a scalar decay, the decay matrices; the backward recomputes only elementwise
decay factors. Chunks go in groups of about DECAY_GROUP_TOKENS tokens (chunk-major layout: a group is one
contiguous slice, its temporaries stay in cache), the backward in reverse order.
"""
from __future__ import annotations

import torch

from .chunk_math import (chunk_size_for, chunks, decay_factors, decay_matrix, decays, forward_groups, gram_scalar,
                         gram_vector, gram_vector_backward, prepare, scaled, take, unchunk)

# Tokens per group of chunks (its per-group work is lighter than the delta engine's, so its groups are
# longer: fewer Python steps). 512: GLA forward and forward+backward ~5% faster than at 256 or 1024 (N=4096,
# 1 thread); retention at N=16384 the same at 512 and 1024. The autograd path keeps the previous engine's 1024.
DECAY_GROUP_TOKENS = 512
_AUTOGRAD_GROUP_TOKENS = 1024


def _state_scan(S, d, dS):
    """S_{i+1} = d_i ⊙ S_i + dS_i over the chunks (dim 0) of `(n, BH, K, V)`. Returns (S_i for each chunk
    stacked, S after the last)."""
    if d is None:
        cs = dS.cumsum(0)
        return torch.cat([torch.zeros_like(cs[:1]), cs[:-1]]) + S, cs[-1] + S
    states = []
    for d_i, dS_i in zip(d, dS):
        states.append(S)
        S = torch.addcmul(dS_i, d_i, S)
    return torch.stack(states), S


def _state_scan_backward(dS, d, dS_o):
    """Adjoint of `_state_scan`: dS the cotangent of the state after the last chunk, dS_o `(n, BH, K, V)` the
    cotangents the chunks' outputs send to the states entering them. Returns (cotangent of the state after
    each chunk `(n, BH, K, V)`, cotangent of the state before the first)."""
    if d is None:
        rc = dS_o.flip(0).cumsum(0).flip(0)                             # sum over chunks j >= i
        return torch.cat([rc[1:], torch.zeros_like(rc[:1])]) + dS, rc[0] + dS
    afters = [None] * len(dS_o)
    for i in reversed(range(len(dS_o))):
        afters[i] = dS
        dS = torch.addcmul(dS_o[i], d[i], dS)
    return torch.stack(afters), dS


def _flat_group(q, k, v, G):
    """A group's chunk-major operands flattened to M = n * BH matrices, with the sizes (n, BH, Gq, C, K, V, M)."""
    n, BH, Gq, C, K = q.shape
    V, M = v.shape[-1], n * BH
    G = None if G is None else G.reshape(M, *G.shape[2:])
    return (n, BH, Gq, C, K, V, M), q.reshape(M, Gq, C, K), k.reshape(M, C, K), v.reshape(M, C, V), G


def _decay_group(q, k, v, G, S):
    """One group of n chunks, chunk-major: q `(n, BH, Gq, C, K)`, k `(n, BH, C, K)`, v `(n, BH, C, V)` in the
    matmul dtype; G None | `(n, BH, C)` | `(n, BH, C, K)` and S `(BH, K, V)` in the compute dtype.
    Returns (o `(n, BH, Gq * C, V)`, S, saved = (A, entering states, decay matrix or None))."""
    (n, BH, Gq, C, K, V, M), q, k, v, G = _flat_group(q, k, v, G)
    md, cd = q.dtype, S.dtype
    eG, eL, d = decays(G)
    E = None
    if G is not None and G.dim() == 3:
        A = gram_vector(q.to(cd), k[:, None].to(cd), G[:, None], md).to(md)      # (M, Gq, C, C)
    else:
        A = (q.view(M, Gq * C, K) @ k.transpose(1, 2)).view(M, Gq, C, C)
        if G is None:
            A = A.tril()
        else:
            E = decay_matrix(G)
            A = scaled(A, E[:, None], md)
    kd = scaled(k, eL, md)
    prev, S = _state_scan(S, None if d is None else d.view(n, BH, *d.shape[1:]),
                          (kd.transpose(1, 2) @ v).to(cd).view(n, BH, K, V))
    prev = prev.view(M, K, V).to(md)
    qd = scaled(q, None if eG is None else eG[:, None], md)
    o = torch.baddbmm(A.view(M, Gq * C, C) @ v, qd.view(M, Gq * C, K), prev)
    return o.view(n, BH, Gq * C, V), S, (A, prev, E)


def _decay_group_backward(q, k, v, G, saved, do, dS):
    """Backward of `_decay_group` for do `(n, BH, Gq * C, V)` (matmul dtype) and dS (cotangent of the state
    after the group). Returns (dq, dk, dv, dΓ or None) chunk-major `(n, BH, ...)` in the compute dtype, and the
    cotangent of the state before."""
    A, prev, E = saved
    (n, BH, Gq, C, K, V, M), q, k, v, G = _flat_group(q, k, v, G)
    md, cd = q.dtype, dS.dtype
    do = do.reshape(M, Gq * C, V)
    eG, eL, d = decays(G)
    qd = scaled(q, None if eG is None else eG[:, None], md)
    kd = scaled(k, eL, md)
    dS_o = (qd.view(M, Gq * C, K).transpose(1, 2) @ do).to(cd).view(n, BH, K, V)
    dSn, dS = _state_scan_backward(dS, None if d is None else d.view(n, BH, *d.shape[1:]), dS_o)
    dSn = dSn.view(M, K, V)
    dSn_m = dSn.to(md)
    dv = torch.baddbmm(A.view(M, Gq * C, C).transpose(1, 2) @ do, kd, dSn_m)
    dA = (do @ v.transpose(1, 2)).view(M, Gq, C, C)
    dqd = (do @ prev.transpose(1, 2)).view(M, Gq, C, K)
    dkd = v @ dSn_m.transpose(1, 2)
    shape = lambda x: x.view(n, BH, *x.shape[1:])  # noqa: E731
    if G is not None and G.dim() == 3:                                 # per-channel decay
        dq, dk = gram_vector_backward(q.to(cd), k[:, None].to(cd), G[:, None], dA.to(cd), md)
        dq = torch.addcmul(dq, dqd, eG[:, None])
        dk = torch.addcmul(dk[:, 0], dkd, eL)
        dG = (q * dq).sum(1) - k * dk
        dG[:, -1, :] += (kd * dkd).sum(-2, dtype=cd) + d[..., 0] * (prev * dSn).sum(-1)
        return shape(dq), shape(dk), shape(dv), shape(dG), dS
    dA = dA.tril() if E is None else scaled(dA, E[:, None], md)
    dq = (dA.view(M, Gq * C, C) @ k).view(M, Gq, C, K)
    dk = dA.view(M, Gq * C, C).transpose(1, 2) @ q.reshape(M, Gq * C, K)
    if G is None:
        return shape(dq.to(cd) + dqd), shape(dk.to(cd) + dkd), shape(dv), None, dS
    dq = torch.addcmul(dq.to(cd), dqd, eG[:, None])                   # scalar decay
    dk = torch.addcmul(dk.to(cd), dkd, eL)
    dG = (q * dq).sum((1, -1)) - (k * dk).sum(-1)
    dG[:, -1] += (kd * dkd).sum((-1, -2), dtype=cd) + d[:, 0, 0] * (prev * dSn).sum((-1, -2))
    return shape(dq), shape(dk), shape(dv), shape(dG), dS


def _forward(q, k, v, scale, g, initial_state, chunk_size, md, save):
    """The engine on chunk-major tensors (q, k, v cast to the matmul dtype md; g and the state in the compute
    dtype): returns (o in q's dtype, S_N, saved or None, dims)."""
    B, H, Gq, N, K = q.shape
    V = v.shape[-1]
    C = chunk_size_for(N, chunk_size)
    md = md or q.dtype
    qv, kv, vv = chunks(q, C, time_dim=3), chunks(k, C), chunks(v, C)                # (NC, BH, ..., C, .)
    gv = None if g is None else chunks(g, C)
    if initial_state is not None:
        S = initial_state.reshape(B * H, K, V)
    else:
        S = torch.zeros(B * H, K, V, device=q.device, dtype=g.dtype if g is not None else _compute(q.dtype))
    out = q.new_empty(B, H, Gq, qv.shape[0] * C, V)
    S, saved = forward_groups(lambda sl, S: _decay_group(*_group_inputs(qv, kv, vv, gv, sl, md, scale), S),
                              out, C, max(1, DECAY_GROUP_TOKENS // C), S, save)
    return (out.narrow(3, 0, N), S.reshape(B, H, K, V), ((qv, kv, vv, gv), saved) if save else None,
            (B, H, Gq, N, K, V, C))


def _group_inputs(qv, kv, vv, gv, sl, md, scale):
    """The group's operands, contiguous: q (times scale), k, v in the matmul dtype; Γ = the in-chunk cumsum of g."""
    return (take(qv[sl], md, scale), take(kv[sl], md), take(vv[sl], md),
            None if gv is None else torch.cumsum(gv[sl], 2).contiguous())


def _compute(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


class _DecayChunk(torch.autograd.Function):
    """The decay engine with its hand-written backward (gradients of q, k, v, g and the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, md):
        o, S, (inputs, per_group), dims = _forward(q, k, v, scale, g, initial_state, chunk_size, md, True)
        ctx.save_for_backward(*inputs)
        ctx.per_group = per_group      # intermediates of each group (not inputs or outputs: kept on ctx, no copy)
        ctx.dims, ctx.scale, ctx.dtypes = dims, scale, (q.dtype, k.dtype, v.dtype, S.dtype)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        qv, kv, vv, gv = ctx.saved_tensors
        per_group, ctx.per_group = ctx.per_group, None
        B, H, Gq, N, K, V, C = ctx.dims
        tq, tk, tv, cd = ctx.dtypes
        md = per_group[0][0].dtype
        dov = chunks(do, C, time_dim=3)
        dS = dS.reshape(B * H, K, V).to(cd)
        n = max(1, DECAY_GROUP_TOKENS // C)
        NC = qv.shape[0]
        new = qv.new_empty
        dq, dk, dv = new(B, H, Gq, NC * C, K, dtype=tq), new(B, H, NC * C, K, dtype=tk), new(B, H, NC * C, V, dtype=tv)
        dg = None if gv is None else new(B, H, NC * C, *gv.shape[3:], dtype=cd)
        dests = [chunks(dq, C, time_dim=3), chunks(dk, C), chunks(dv, C), None if dg is None else chunks(dg, C)]
        for j in reversed(range(len(per_group))):
            sl = slice(j * n, (j + 1) * n)
            dqg, dkg, dvg, dGg, dS = _decay_group_backward(*_group_inputs(qv, kv, vv, gv, sl, md, ctx.scale),
                                                           per_group[j], take(dov[sl], md).view(-1, B * H, Gq * C, V),
                                                           dS)
            per_group[j] = None
            torch.mul(dqg, ctx.scale, out=dests[0][sl])
            dests[1][sl], dests[2][sl] = dkg, dvg
            if dGg is not None:
                dests[3][sl] = dGg.flip(2).cumsum(2).flip(2)                   # dg: in-chunk reverse cumsum
        dq, dk, dv = dq.narrow(3, 0, N), dk.narrow(2, 0, N), dv.narrow(2, 0, N)
        dg = None if dg is None else dg.narrow(2, 0, N)
        dS0 = dS.reshape(B, H, K, V) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dg, dS0, None, None, None


# ------------------------------------------------------------------------ autograd path (the oracle)

def _decay_group_autograd(qc, kc, vc, G, S):
    """The previous engine's group (layout `(BH, n, ...)`), kept as the autograd path: differentiated by
    autograd it is the oracle of the hand-written backward and the timing baseline."""
    BH, n, Gq, C, K = qc.shape
    Gb = None if G is None else G[:, :, None]                         # broadcast over the query heads
    if G is None or G.dim() == 3:
        A = gram_scalar(qc, kc[:, :, None], Gb)
    else:
        A = gram_vector(qc, kc[:, :, None], Gb)                       # (BH, n, Gq, C, C)
    qd, kd, d = decay_factors(G, qc, kc)
    dS = kd.transpose(-1, -2) @ vc
    if d is None:
        cs = dS.cumsum(1)
        prev, S = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], 1) + S[:, None], cs[:, -1] + S
    else:
        states = []
        for d_n, dS_n in zip(d.unbind(1), dS.unbind(1)):
            states.append(S)
            S = torch.addcmul(dS_n, d_n, S)
        prev = torch.stack(states, 1)
    o = A.reshape(BH, n, Gq * C, C) @ vc + qd.reshape(BH, n, Gq * C, K) @ prev
    return o, S


def _forward_autograd(q, k, v, scale, g, initial_state, chunk_size):
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, _ = prepare(q, k, v, scale, g, initial_state, chunk_size)
    NC = kc.shape[2]

    def flat(x):
        return None if x is None else x.reshape(B * H, NC, *x.shape[3:])

    qc, kc, vc, G = flat(qc), flat(kc), flat(vc), flat(G)
    S = S.reshape(B * H, K, V)
    n = max(1, _AUTOGRAD_GROUP_TOKENS // C)
    groups = zip(*(x.split(n, 1) for x in (qc, kc, vc)), G.split(n, 1) if G is not None else [None] * NC)
    outs = []
    for qg, kg, vg, Gg in groups:
        o, S = _decay_group_autograd(qg, kg, vg, Gg, S)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return unchunk(o.view(B, H, NC, Gq * C, V), B, H, Gq, C, N), S.reshape(B, H, K, V)


def chunk_decay_attention(q, k, v, scale: float, g=None, initial_state=None, chunk_size: int = 64, *,
                          md=None, autograd: bool = False):
    """Causal linear attention with optional decay. q `(B, H, Gq, N, K)` (Gq query heads per key
    head), k `(B, H, N, K)`, v `(B, H, N, V)`, g None | `(B, H, N)` (scalar log-decay) |
    `(B, H, N, K)` (per channel), initial_state `(B, H, K, V)` or None. g and the state are in the compute dtype
    (fp32 / fp64); q, k, v in any float dtype: md is the dtype of the matmul operands
    (`chunk_math.matmul_dtype`; None: q's), the output comes back in q's dtype.
    Returns `(o (B, H, Gq, N, V), S_N (B, H, K, V))`, differentiable in every tensor input by the
    hand-written backward; `autograd=True` runs the previous engine differentiated by autograd instead (the
    gradient oracle of the tests and the timing baseline; md ignored)."""
    if autograd:
        return _forward_autograd(q, k, v, scale, g, initial_state, chunk_size)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, initial_state)):
        return _DecayChunk.apply(q, k, v, g, initial_state, scale, chunk_size, md)
    return _forward(q, k, v, scale, g, initial_state, chunk_size, md, save=False)[:2]
