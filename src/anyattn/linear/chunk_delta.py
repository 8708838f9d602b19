"""Delta engine of the linear family (DeltaNet, Gated DeltaNet, KDA; MoM runs it per memory): chunkwise
forward by the WY / UT transform, and its hand-written backward.

Per chunk (Γ: in-chunk cumulative log-decay, scalar, per key channel or absent; S: the entering state):

    A_kk = strict lower part of the decayed gram of (β ⊙ K, K),  A_qk = decayed gram of (Q, K) (c <= r)
    T = (I + A_kk)^{-1}  (explicit: `unit_lower_inverse`),  [W, U] = T [β e^Γ ⊙ K, β ⊙ V]
    Ṽ = U - W S,   O = A_qk Ṽ + (Q ⊙ e^Γ) S,   S' = e^{Γ_C} ⊙ S + (e^{Γ_C - Γ} ⊙ K)^T Ṽ

Only the state passing (Ṽ, S') is a loop over chunks; grams, T, W, U and O are batched over the chunks
of a group of about GROUP_TOKENS tokens. Backward, dS' the cotangent of the state after a chunk
(a reverse loop over chunks: dṼ = A_qk^T dO + (e^{Γ_C - Γ} ⊙ K) dS',
dS = (Q ⊙ e^Γ)^T dO + e^{Γ_C} ⊙ dS' - W^T dṼ), then batched:

    d[W, U] = [-dṼ S^T, dṼ],   dR = T^T d[W, U],   dA_kk = -(dR [W, U]^T) (strict lower part),
    dA_qk = dO Ṽ^T,  d(Q ⊙ e^Γ) = dO S^T,  d(e^{Γ_C - Γ} ⊙ K) = Ṽ dS'^T,
    dQ, dK, dβ through the grams and the decayed factors; dΓ collected from them (`chunk_math`), and
    dg = the in-chunk reverse cumsum of dΓ.

Saved for backward: A_qk, T, [W, U], Ṽ and the entering states (one K x V matrix per chunk); the
backward recomputes only elementwise factors.
"""
from __future__ import annotations

import torch

from .chunk_math import (chunk_log_decay_backward, decay_factors, decay_matrix, gram_vector, gram_vector_backward,
                         mm, prepare, solve_unit_lower, unchunk, unit_lower_inverse)

# Tokens per group of chunks: every step of a group (grams, inverse, state passing) works on about this
# many tokens of every head, so its operands stay in cache.
GROUP_TOKENS = 256


def _grams(q, k, kb, G, md):
    """(A_kk strictly lower `(M, C, C)`, A_qk `(M, Gq, C, C)`): decayed grams of (kb, k) and (q, k).
    q `(M, Gq, C, K)`, k, kb `(M, C, K)`, G None | `(M, C)` | `(M, C, K)`."""
    M, Gq, C, K = q.shape
    if G is not None and G.dim() == 3:
        A = gram_vector(torch.cat([kb[None], q.transpose(0, 1)]), k, G, md)   # (1 + Gq, M, C, C)
        return A[0].tril(-1), A[1:].transpose(0, 1)
    A = mm(torch.cat([kb[:, None], q], 1).view(M, (1 + Gq) * C, K), k.transpose(1, 2), md).view(M, 1 + Gq, C, C)
    A = A.tril() if G is None else A * decay_matrix(G)[:, None]
    return A[:, 0].tril(-1), A[:, 1:]


def _exp_g(G, x):
    """e^Γ shaped to multiply x `(M, C, K)` (1 when there is no decay)."""
    if G is None:
        return 1.0
    return torch.exp(G)[..., None] if G.dim() == 2 else torch.exp(G)


def _delta_group(qc, kc, vc, bc, G, S, md=None):
    """One group of n chunks of every (batch, head) row, flattened to M = BH * n matrices: qc `(BH, n, Gq,
    C, K)`, kc `(BH, n, C, K)`, vc `(BH, n, C, V)`, bc `(BH, n, C)`, G None | `(BH, n, C)` | `(BH, n, C, K)`,
    S `(BH, K, V)` the state before the group; md: matmul operand dtype (None: the inputs').
    Returns (o `(BH, n, Gq * C, V)`, S, saved = (A_qk, T, W, Ṽ, entering states), all with M leading)."""
    BH, n, Gq, C, K = qc.shape
    V = vc.shape[-1]
    M = BH * n
    q, k, v, b = qc.reshape(M, Gq, C, K), kc.reshape(M, C, K), vc.reshape(M, C, V), bc.reshape(M, C)
    G = None if G is None else G.reshape(M, C, *G.shape[3:])
    kb = k * b[:, :, None]
    A_kk, A_qk = _grams(q, k, kb, G, md)
    T = unit_lower_inverse(A_kk)
    X = mm(T, torch.cat([kb * _exp_g(G, k), v * b[:, :, None]], -1), md)          # [W, U]
    qd, kd, d = decay_factors(G, q, k)
    W, U = X.view(BH, n, C, K + V).split([K, V], -1)
    kdT = kd.view(BH, n, C, K).transpose(-1, -2)
    d = [None] * n if d is None else d.view(BH, n, *d.shape[1:]).unbind(1)
    Vn, prev = [], []
    if md is None or md == q.dtype:
        for W_i, U_i, kdT_i, d_i in zip(W.unbind(1), U.unbind(1), kdT.unbind(1), d):
            prev.append(S)
            v_new = torch.baddbmm(U_i, W_i, S, alpha=-1.0)                          # Ṽ = U - W S
            Vn.append(v_new)
            S = torch.baddbmm(S if d_i is None else S * d_i, kdT_i, v_new)
    else:                                                              # low-precision operands, fp32 state
        for W_i, U_i, kdT_i, d_i in zip(W.to(md).unbind(1), U.unbind(1), kdT.to(md).unbind(1), d):
            prev.append(S)
            v_new = U_i - (W_i @ S.to(md)).to(S.dtype)
            Vn.append(v_new)
            S = (kdT_i @ v_new.to(md)).to(S.dtype) + (S if d_i is None else S * d_i)
    Vn, prev = torch.stack(Vn, 1).view(M, C, V), torch.stack(prev, 1).view(M, K, V)
    o = mm(A_qk.reshape(M, Gq * C, C), Vn, md) + mm(qd.reshape(M, Gq * C, K), prev, md)
    return o.view(BH, n, Gq * C, V), S, (A_qk, T, X[..., :K], Vn, prev)


def _delta_group_backward(qc, kc, vc, bc, G, A_qk, T, W, Vn, prev, do, dS, md=None):
    """Backward of `_delta_group` for do `(BH, n, Gq * C, V)` and dS (cotangent of the state after the group).
    Returns (dq, dk, dv, dβ, dΓ or None) with M = BH * n leading, and the cotangent of the state before.

    With r = β ⊙ (V - e^Γ K S) the UT transform reads Ṽ = T r, so dr = T^T dṼ, d(β ⊙ V) = dr,
    d(β e^Γ ⊙ K) = -dr S^T and dA_kk = -dr Ṽ^T: three matmuls, none through W or U."""
    BH, n, Gq, C, K = qc.shape
    V = vc.shape[-1]
    M = BH * n
    q, k, v, b = qc.reshape(M, Gq, C, K), kc.reshape(M, C, K), vc.reshape(M, C, V), bc.reshape(M, C)
    G = None if G is None else G.reshape(M, C, *G.shape[3:])
    do = do.reshape(M, Gq * C, V)
    qd, kd, d = decay_factors(G, q, k)
    dV_in = mm(A_qk.reshape(M, Gq * C, C).transpose(1, 2), do, md).view(BH, n, C, V)     # A_qk^T dO
    dS_o = mm(qd.reshape(M, Gq * C, K).transpose(1, 2), do, md).view(BH, n, K, V)        # (Q e^Γ)^T dO
    dVn, dSn = _state_passing_backward(dS, dV_in, dS_o, W.view(BH, n, C, K).transpose(-1, -2),
                                       kd.view(BH, n, C, K), None if d is None else d.view(BH, n, *d.shape[1:]), md)
    dS = dSn[1]
    dVn, dSn = dVn.view(M, C, V), dSn[0].view(M, K, V)
    dr = mm(T.transpose(1, 2), dVn, md)                                        # (M, C, V)
    Y = torch.cat([-dr[:, None], do.view(M, Gq, C, V)], 1).view(M, (1 + Gq) * C, V)
    Z = mm(Y, Vn.transpose(1, 2), md).view(M, 1 + Gq, C, C)                    # [dA_kk, dA_qk] (before masks)
    P = mm(Y, prev.transpose(1, 2), md).view(M, 1 + Gq, C, K)                  # [d(β e^Γ K), d(Q e^Γ)]
    dkd = mm(Vn, dSn.transpose(1, 2), md)                                      # d(e^{Γ_C - Γ} K)
    dkg, dqd = P[:, 0], P[:, 1:]
    kb = k * b[:, :, None]
    if G is not None and G.dim() == 3:
        Z = Z.tril()
        Z[:, 0].diagonal(dim1=-2, dim2=-1).zero_()
        rows, dk_col = gram_vector_backward(torch.cat([kb[None], q.transpose(0, 1)]), k, G, Z.transpose(0, 1), md)
        d_kb, dq = rows[0], rows[1:].transpose(0, 1)
    else:
        Z = Z.tril() if G is None else Z * decay_matrix(G)[:, None]
        Z[:, 0].diagonal(dim1=-2, dim2=-1).zero_()
        Z = Z.view(M, (1 + Gq) * C, C)
        rows = mm(Z, k, md).view(M, 1 + Gq, C, K)
        dk_col = mm(Z.transpose(1, 2), torch.cat([kb[:, None], q], 1).view(M, (1 + Gq) * C, K), md)
        d_kb, dq = rows[:, 0], rows[:, 1:]
    if G is None:
        dq = dq + dqd
        d_row = d_kb + dkg                                              # d(β k): the gram's rows and kg = β k
        dk = d_row * b[:, :, None] + dk_col + dkd
        return dq, dk, dr * b[:, :, None], (k * d_row).sum(-1) + (dr * v).sum(-1), None, dS
    eG = _exp_g(G, k)
    dq = torch.addcmul(dq, dqd, eG[:, None])
    d_row = torch.addcmul(d_kb, dkg, eG)                               # d(β k): gram rows and kg = β e^Γ k
    dk_b = d_row * b[:, :, None]
    dk_c = torch.addcmul(dk_col, dkd, _exp_last(G, k))                 # gram columns and kd = e^{Γ_C - Γ} k
    dk = dk_b + dk_c
    db = (k * d_row).sum(-1) + (dr * v).sum(-1)
    # dΓ = Σ_q q dq + (β k) d_kb + kg dkg - k dk_col - kd dkd  (+ the chunk-end terms)
    dG = (q * dq).sum(1) + k * (dk_b - dk_c)
    last = (kd * dkd).sum(-2) + (prev * dSn).sum(-1) * d[..., 0]         # (M, K) or (M, 1)
    if G.dim() == 2:
        dG = dG.sum(-1)
        dG[:, -1] += last.sum(-1)
    else:
        dG[:, -1, :] += last
    return dq, dk, dr * b[:, :, None], db, dG, dS


def _state_passing_backward(dS, dV_in, dS_o, WT, kd, d, md):
    """Reverse loop over the n chunks of a group (the adjoint of Ṽ = U - W S, S' = d ⊙ S + kd^T Ṽ):
    dṼ = dV_in + kd dS',  dS = dS_o + d ⊙ dS' - W^T dṼ. WT `(BH, n, K, C)`, kd `(BH, n, C, K)`, d None or
    `(BH, n, K or 1, 1)`. Returns (dṼ `(BH, n, C, V)`, (dS' for each chunk `(BH, n, K, V)`, dS before))."""
    n = WT.shape[1]
    dl = [None] * n if d is None else d.unbind(1)
    dVn, dSn = [None] * n, [None] * n
    fp = md is None or md == dS.dtype
    if not fp:
        WT, kd = WT.to(md), kd.to(md)
    for i in reversed(range(n)):
        dSn[i] = dS
        carry = dS_o[:, i] + dS if dl[i] is None else torch.addcmul(dS_o[:, i], dS, dl[i])
        if fp:
            dv_i = torch.baddbmm(dV_in[:, i], kd[:, i], dS)
            dS = torch.baddbmm(carry, WT[:, i], dv_i, alpha=-1.0)
        else:
            dv_i = dV_in[:, i] + (kd[:, i] @ dS.to(md)).to(dS.dtype)
            dS = carry - (WT[:, i] @ dv_i.to(md)).to(dS.dtype)
        dVn[i] = dv_i
    return torch.stack(dVn, 1), (torch.stack(dSn, 1), dS)


def _exp_last(G, k):
    """e^{Γ_C - Γ} shaped to multiply k `(M, C, K)` (1 without decay)."""
    if G is None:
        return 1.0
    if G.dim() == 2:
        return torch.exp(G[:, -1:] - G)[..., None]
    return torch.exp(G[:, -1:, :] - G)


def _delta_group_autograd(qc, kc, vc, bc, G, S):
    """The previous engine's group (block forward substitution, per-chunk outputs in the loop), kept as the
    autograd path: differentiated by autograd it is the oracle of the hand-written backward."""
    BH, n, Gq, C, K = qc.shape
    V = vc.shape[-1]
    M = BH * n
    q, k, v, b = qc.reshape(M, Gq, C, K), kc.reshape(M, C, K), vc.reshape(M, C, V), bc.reshape(M, C)
    G = None if G is None else G.reshape(M, C, *G.shape[3:])
    kT = k.transpose(1, 2)
    if G is None:
        A_qk, A_kk = (q.reshape(M, Gq * C, K) @ kT).view(M, Gq, C, C).tril(), k @ kT
    elif G.dim() == 2:
        E = decay_matrix(G)
        A_qk, A_kk = (q.reshape(M, Gq * C, K) @ kT).view(M, Gq, C, C) * E[:, None], (k @ kT) * E
    else:
        A = gram_vector(torch.cat([k[None], q.transpose(0, 1)]), k, G)  # (1 + Gq, M, C, C)
        A_qk, A_kk = A[1:].transpose(0, 1), A[0]
    A_kk = A_kk.tril(-1) * b[:, :, None]
    qd, kd, d = decay_factors(G, q, k)
    if G is None:
        kg = k * b[:, :, None]
    elif G.dim() == 2:
        kg = k * (torch.exp(G) * b)[:, :, None]
    else:
        kg = k * (torch.exp(G) * b[:, :, None])
    X = solve_unit_lower(A_kk, torch.cat([kg, v * b[:, :, None]], -1)).view(BH, n, C, K + V)
    W, U = X.split([K, V], -1)                                         # (BH, n, C, K), (BH, n, C, V)
    kdT = kd.view(BH, n, C, K).transpose(-1, -2)
    qd, A_qk = qd.reshape(BH, n, Gq * C, K), A_qk.reshape(BH, n, Gq * C, C)
    d = None if d is None else d.view(BH, n, *d.shape[1:])
    outs = []
    per_chunk = zip(W.unbind(1), U.unbind(1), A_qk.unbind(1), qd.unbind(1), kdT.unbind(1),
                    d.unbind(1) if d is not None else [None] * n)
    for W_i, U_i, A_i, qd_i, kdT_i, d_i in per_chunk:
        v_new = torch.baddbmm(U_i, W_i, S, alpha=-1.0)                # Ṽ = U - W S
        outs.append(torch.baddbmm(A_i @ v_new, qd_i, S))              # O = A_qk Ṽ + (Q ⊙ e^Γ) S
        S = torch.baddbmm(S if d_i is None else S * d_i, kdT_i, v_new)
    return torch.stack(outs, 1), S, None


def _flat(x, BH, NC):
    return None if x is None else x.reshape(BH, NC, *x.shape[3:])


def _groups(n, *xs):
    """Split each tensor (or None) along the chunk dim (dim 1) into groups of n chunks."""
    NC = next(x for x in xs if x is not None).shape[1]
    return list(zip(*(x.split(n, 1) if x is not None else [None] * -(-NC // n) for x in xs)))


def _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md, save, autograd=False):
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, (bc,) = prepare(q, k, v, scale, g, initial_state, chunk_size,
                                                              extra=(beta,))
    NC = kc.shape[2]
    BH = B * H
    qc, kc, vc, bc, G = (_flat(x, BH, NC) for x in (qc, kc, vc, bc, G))
    S = S.reshape(BH, K, V)
    outs, saved = [], []
    for qg, kg, vg, bg, Gg in _groups(max(1, GROUP_TOKENS // C), qc, kc, vc, bc, G):
        if autograd:
            o, S, sv = _delta_group_autograd(qg, kg, vg, bg, Gg, S)
        else:
            o, S, sv = _delta_group(qg, kg, vg, bg, Gg, S, md)
        outs.append(o)
        if save:
            saved.append(sv)
    o = unchunk(torch.cat(outs, 1).view(B, H, NC, Gq * C, V), B, H, Gq, C, N)
    if save:
        saved = ((qc, kc, vc, bc, G), saved)
    return o, S.reshape(B, H, K, V), saved, (B, H, Gq, N, K, V, C, NC)


class _DeltaChunk(torch.autograd.Function):
    """The delta engine with its hand-written backward (gradients of q, k, v, beta, g, the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, chunk_size, md):
        o, S, (inputs, per_group), dims = _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md,
                                                     save=True)
        ctx.save_for_backward(*inputs)
        ctx.per_group = per_group      # intermediates of each group (not inputs or outputs: kept on ctx, no copy)
        ctx.dims, ctx.scale, ctx.md, ctx.has_g = dims, scale, md, g is not None
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        qc, kc, vc, bc, G = ctx.saved_tensors
        per_group, ctx.per_group = ctx.per_group, None
        B, H, Gq, N, K, V, C, NC = ctx.dims
        BH = B * H
        do = torch.nn.functional.pad(do, (0, 0, 0, NC * C - N)) if NC * C != N else do
        do = do.reshape(B, H, Gq, NC, C, V).transpose(2, 3).reshape(BH, NC, Gq * C, V)
        dS = dS.reshape(BH, K, V)
        n = max(1, GROUP_TOKENS // C)
        inputs = _groups(n, qc, kc, vc, bc, G, do)
        grads = []
        for i in reversed(range(len(inputs))):
            qg, kg, vg, bg, Gg, dog = inputs[i]
            *gr, dS = _delta_group_backward(qg, kg, vg, bg, Gg, *per_group[i], dog, dS, ctx.md)
            per_group[i] = None
            grads.append([None if x is None else x.view(BH, -1, *x.shape[1:]) for x in gr])
        dq, dk, dv, db, dG = (None if xs[0] is None else torch.cat(xs[::-1], 1) for xs in zip(*grads))
        dq = dq.reshape(B, H, NC, Gq, C, K).transpose(2, 3).reshape(B, H, Gq, NC * C, K)[:, :, :, :N] * ctx.scale
        dk = dk.reshape(B, H, NC * C, K)[:, :, :N]
        dv = dv.reshape(B, H, NC * C, V)[:, :, :N]
        db = db.reshape(B, H, NC * C)[:, :, :N]
        dg = None
        if ctx.has_g:
            dg = chunk_log_decay_backward(dG.reshape(B, H, NC, C, *dG.shape[3:]))[:, :, :N]
        dS0 = dS.reshape(B, H, K, V) if ctx.needs_input_grad[5] else None
        return dq, dk, dv, db, dg, dS0, None, None, None


def chunk_delta(q, k, v, beta, scale: float, g=None, initial_state=None, chunk_size: int = 64, *,
                md=None, autograd: bool = False):
    """Delta-rule family. q `(B, H, Gq, N, K)` (Gq query heads per key head), k `(B, H, N, K)`,
    v `(B, H, N, V)`, beta `(B, H, N)`, g None (DeltaNet) | `(B, H, N)` (Gated DeltaNet) |
    `(B, H, N, K)` (KDA), initial_state `(B, H, K, V)` or None; all in the compute dtype. md: dtype of the
    matmul operands (`chunk_math.matmul_dtype`; None: the inputs'). Returns `(o (B, H, Gq, N, V), S_N)`,
    differentiable in every tensor input by the hand-written backward; `autograd=True` runs the previous
    engine (block forward substitution) differentiated by autograd instead: the gradient oracle of the
    tests and the timing baseline (md ignored)."""
    if autograd:
        return _forward(q, k, v, beta, scale, g, initial_state, chunk_size, None, save=False, autograd=True)[:2]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, g, initial_state)):
        return _DeltaChunk.apply(q, k, v, beta, g, initial_state, scale, chunk_size, md)
    return _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md, save=False)[:2]
