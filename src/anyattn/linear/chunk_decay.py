"""Decay engine of the linear family (linear attention, retention / Lightning, GLA): chunkwise forward
and its hand-written backward.

Per chunk n (Γ: in-chunk cumulative log-decay, scalar or per key channel; S_n: the state entering it):

    O_n     = A_n V_n + (Q_n ⊙ e^Γ) S_n          A_n: decayed gram of (Q_n, K_n), c <= r
    S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K_n)^T V_n

Backward, with dS_n the cotangent of S_n (a reverse scan: dS_n = e^{Γ_C} ⊙ dS_{n+1} + (Q_n ⊙ e^Γ)^T dO_n):

    dV = A^T dO + (e^{Γ_C - Γ} ⊙ K) dS_{n+1},   dA = dO V^T,   d(Q ⊙ e^Γ) = dO S_n^T,
    d(e^{Γ_C - Γ} ⊙ K) = V dS_{n+1}^T,  then dQ, dK through the gram's backward,
    dΓ = Σ_queries Q ⊙ dQ - K ⊙ dK, and at the chunk's last position also
         Σ_c (e^{Γ_C - Γ} ⊙ K) ⊙ d(e^{Γ_C - Γ} ⊙ K) + e^{Γ_C} ⊙ Σ_v S_n ⊙ dS_{n+1};
    dg = in-chunk reverse cumsum of dΓ.

Saved for backward: the scaled chunked inputs, the grams A and the states entering each chunk (one K x V
matrix per chunk); the backward recomputes only the elementwise decay factors. Chunks go in groups of
about DECAY_GROUP_TOKENS tokens (small temporaries that stay in cache), the backward in reverse order.
"""
from __future__ import annotations

import torch

from .chunk_math import (chunk_log_decay_backward, decay_factors, decay_matrix, gram_scalar, gram_vector,
                         gram_vector_backward, mm, prepare, unchunk)

# Tokens per group of chunks (its per-group work is lighter than the delta engine's, so its groups are
# longer: fewer Python steps).
DECAY_GROUP_TOKENS = 1024


def _state_scan(S, d, dS):
    """S_{n+1} = d_n ⊙ S_n + dS_n over chunks (dim 1 of `(BH, n, K, V)`). Returns (S_n for each chunk
    stacked, S after the last)."""
    if d is None:
        cs = dS.cumsum(1)
        prev = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], 1) + S[:, None]
        return prev, cs[:, -1] + S
    states = []
    for d_n, dS_n in zip(d.unbind(1), dS.unbind(1)):
        states.append(S)
        S = torch.addcmul(dS_n, d_n, S)
    return torch.stack(states, 1), S


def _state_scan_backward(dS, d, dS_o):
    """Adjoint of `_state_scan`: dS the cotangent of the state after the last chunk, dS_o `(BH, n, K, V)` the
    cotangents the chunks' outputs send to the states entering them. Returns (cotangent of the state after
    each chunk `(BH, n, K, V)`, cotangent of the state before the first)."""
    if d is None:
        rc = dS_o.flip(1).cumsum(1).flip(1)                             # sum over chunks j >= i
        after = torch.cat([rc[:, 1:], torch.zeros_like(rc[:, :1])], 1) + dS[:, None]
        return after, rc[:, 0] + dS
    afters = []
    for d_n, o_n in zip(reversed(d.unbind(1)), reversed(dS_o.unbind(1))):
        afters.append(dS)
        dS = torch.addcmul(o_n, d_n, dS)
    return torch.stack(afters[::-1], 1), dS


def _decay_group(qc, kc, vc, G, S, md=None):
    """One group of n chunks: qc `(BH, n, Gq, C, K)`, kc `(BH, n, C, K)`, vc `(BH, n, C, V)`, G None |
    `(BH, n, C)` | `(BH, n, C, K)`, S `(BH, K, V)`; md: matmul operand dtype (None: the inputs').
    Returns (o `(BH, n, Gq * C, V)`, S, the grams A `(BH, n, Gq, C, C)`, the states entering the chunks)."""
    BH, n, Gq, C, K = qc.shape
    Gb = None if G is None else G[:, :, None]                         # broadcast over the query heads
    if G is None or G.dim() == 3:
        A = gram_scalar(qc, kc[:, :, None], Gb, md=md)
    else:
        A = gram_vector(qc, kc[:, :, None], Gb, md)                   # (BH, n, Gq, C, C)
    qd, kd, d = decay_factors(G, qc, kc)
    prev, S = _state_scan(S, d, mm(kd.transpose(-1, -2), vc, md))    # states before each chunk
    o = mm(A.reshape(BH, n, Gq * C, C), vc, md) + mm(qd.reshape(BH, n, Gq * C, K), prev, md)
    return o, S, A, prev


def _decay_group_backward(qc, kc, vc, G, A, prev, do, dS, md=None):
    """Backward of `_decay_group` for the cotangents do `(BH, n, Gq * C, V)` and dS (state after the group).
    Returns (dqc, dkc, dvc, dΓ or None, cotangent of the state before the group)."""
    BH, n, Gq, C, K = qc.shape
    qd, kd, d = decay_factors(G, qc, kc)
    dS_o = mm(qd.reshape(BH, n, Gq * C, K).transpose(-1, -2), do, md)
    dSn, dS = _state_scan_backward(dS, d, dS_o)                        # dSn: cotangent of the state after each chunk
    dv = mm(A.reshape(BH, n, Gq * C, C).transpose(-1, -2), do, md) + mm(kd, dSn, md)
    dA = mm(do, vc.transpose(-1, -2), md).view(BH, n, Gq, C, C)
    dqd = mm(do, prev.transpose(-1, -2), md).view(BH, n, Gq, C, K)
    dkd = mm(vc, dSn.transpose(-1, -2), md)
    if G is None:
        dA = dA.tril()
        return (mm(dA, kc[:, :, None], md) + dqd, mm(dA.transpose(-1, -2), qc, md).sum(2) + dkd, dv, None, dS)
    if G.dim() == 3:                                                  # scalar decay
        dAE = dA * decay_matrix(G)[:, :, None]
        dq = mm(dAE, kc[:, :, None], md) + dqd * torch.exp(G)[:, :, None, :, None]
        dk = mm(dAE.transpose(-1, -2), qc, md).sum(2) + dkd * torch.exp(G[..., -1:] - G)[..., None]
        dG = (qc * dq).sum((2, -1)) - (kc * dk).sum(-1)
        dG[..., -1] += (kd * dkd).sum((-1, -2)) + d[..., 0, 0] * (prev * dSn).sum((-1, -2))
        return dq, dk, dv, dG, dS
    dq, dk = gram_vector_backward(qc, kc[:, :, None], G[:, :, None], dA, md)
    dq = dq + dqd * torch.exp(G)[:, :, None]
    dk = dk[:, :, 0] + dkd * torch.exp(G[..., -1:, :] - G)
    dG = (qc * dq).sum(2) - kc * dk
    dG[..., -1, :] += (kd * dkd).sum(-2) + d[..., 0] * (prev * dSn).sum(-1)
    return dq, dk, dv, dG, dS


def _flat(x, BH, NC):
    return None if x is None else x.reshape(BH, NC, *x.shape[3:])


def _groups(n, *xs):
    """Split each tensor (or None) along the chunk dim into groups of n chunks."""
    NC = next(x for x in xs if x is not None).shape[1]
    return list(zip(*(x.split(n, 1) if x is not None else [None] * -(-NC // n) for x in xs)))


def _forward(q, k, v, scale, g, initial_state, chunk_size, md, save):
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, _ = prepare(q, k, v, scale, g, initial_state, chunk_size)
    NC = kc.shape[2]
    BH = B * H
    qc, kc, vc, G = (_flat(x, BH, NC) for x in (qc, kc, vc, G))
    S = S.reshape(BH, K, V)
    outs, As, prevs = [], [], []
    for qg, kg, vg, Gg in _groups(max(1, DECAY_GROUP_TOKENS // C), qc, kc, vc, G):
        o, S, A, prev = _decay_group(qg, kg, vg, Gg, S, md)
        outs.append(o)
        if save:
            As.append(A)
            prevs.append(prev)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    o = unchunk(o.view(B, H, NC, Gq * C, V), B, H, Gq, C, N)
    saved = ((qc, kc, vc, G), list(zip(As, prevs))) if save else None
    return o, S.reshape(B, H, K, V), saved, (B, H, Gq, N, K, V, C, NC)


class _DecayChunk(torch.autograd.Function):
    """The decay engine with its hand-written backward (gradients of q, k, v, g and the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale, chunk_size, md):
        o, S, (inputs, per_group), dims = _forward(q, k, v, scale, g, initial_state, chunk_size, md, save=True)
        ctx.save_for_backward(*inputs)
        ctx.per_group = per_group      # intermediates of each group (not inputs or outputs: kept on ctx, no copy)
        ctx.dims, ctx.scale, ctx.md, ctx.has_g = dims, scale, md, g is not None
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        qc, kc, vc, G = ctx.saved_tensors
        per_group, ctx.per_group = ctx.per_group, None
        B, H, Gq, N, K, V, C, NC = ctx.dims
        BH, md = B * H, ctx.md
        do = torch.nn.functional.pad(do, (0, 0, 0, NC * C - N)) if NC * C != N else do
        do = do.reshape(B, H, Gq, NC, C, V).transpose(2, 3).reshape(BH, NC, Gq * C, V)
        dS = dS.reshape(BH, K, V)
        n = max(1, DECAY_GROUP_TOKENS // C)
        dqs, dks, dvs, dGs = [], [], [], []
        inputs = _groups(n, qc, kc, vc, G, do)
        for i in reversed(range(len(inputs))):
            qg, kg, vg, Gg, dog = inputs[i]
            dq, dk, dv, dG, dS = _decay_group_backward(qg, kg, vg, Gg, *per_group[i], dog, dS, md)
            per_group[i] = None
            dqs.append(dq)
            dks.append(dk)
            dvs.append(dv)
            dGs.append(dG)
        dq = torch.cat(dqs[::-1], 1).reshape(B, H, NC, Gq, C, K).transpose(2, 3).reshape(B, H, Gq, NC * C, K)
        dq = dq[:, :, :, :N] * ctx.scale
        dk = torch.cat(dks[::-1], 1).reshape(B, H, NC * C, K)[:, :, :N]
        dv = torch.cat(dvs[::-1], 1).reshape(B, H, NC * C, V)[:, :, :N]
        dg = None
        if ctx.has_g:
            dG = torch.cat(dGs[::-1], 1)
            dg = chunk_log_decay_backward(dG.reshape(B, H, NC, *dG.shape[2:]))[:, :, :N]
        dS0 = dS.reshape(B, H, K, V) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, dg, dS0, None, None, None


def chunk_decay_attention(q, k, v, scale: float, g=None, initial_state=None, chunk_size: int = 64, *,
                          md=None, autograd: bool = False):
    """Causal linear attention with optional decay. q `(B, H, Gq, N, K)` (Gq query heads per key
    head), k `(B, H, N, K)`, v `(B, H, N, V)`, g None | `(B, H, N)` (scalar log-decay) |
    `(B, H, N, K)` (per channel), initial_state `(B, H, K, V)` or None; all in the compute dtype.
    md: dtype of the matmul operands (`chunk_math.matmul_dtype`; None: the inputs').
    Returns `(o (B, H, Gq, N, V), S_N (B, H, K, V))`, differentiable in every tensor input by the
    hand-written backward; `autograd=True` runs the same forward differentiated by autograd instead (the
    gradient oracle of the tests, and the engine's previous backward; md ignored)."""
    if autograd:
        return _forward(q, k, v, scale, g, initial_state, chunk_size, None, save=False)[:2]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, g, initial_state)):
        return _DecayChunk.apply(q, k, v, g, initial_state, scale, chunk_size, md)
    return _forward(q, k, v, scale, g, initial_state, chunk_size, md, save=False)[:2]
