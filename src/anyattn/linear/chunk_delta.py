"""Delta engine of the linear family (DeltaNet, Gated DeltaNet, KDA; MoM runs it per memory): chunkwise forward
by the WY / UT transform, and its hand-written backward.

Per chunk (Γ: in-chunk cumulative log-decay, scalar, per key channel or absent; S: the entering state):

    A_kk = strict lower part of the decayed gram of (β ⊙ K, K),  A_qk = decayed gram of (Q, K) (c <= r)
    T = (I + A_kk)^{-1}  (explicit: `unit_lower_inverse`),  [W, U] = T [β e^Γ ⊙ K, β ⊙ V]
    Ṽ = U - W S,   O = [A_qk | Q ⊙ e^Γ] [Ṽ; S],   S' = e^{Γ_C} ⊙ S + (e^{Γ_C - Γ} ⊙ K)^T Ṽ

Only the state passing (Ṽ, S') is a loop over chunks; grams, T, W, U and O are batched over the chunks
of a group of about GROUP_TOKENS tokens (chunk-major layout: a group is one contiguous slice).

Backward. A reverse loop over chunks, dS' the cotangent of the state after a chunk:
dṼ = A_qk^T dO + (e^{Γ_C - Γ} ⊙ K) dS',  dS = (Q ⊙ e^Γ)^T dO + e^{Γ_C} ⊙ dS' - W^T dṼ; then batched.
With r = β ⊙ (V - e^Γ K S), Ṽ = T r, so dr = T^T dṼ gives d(β ⊙ V) = dr, d(β e^Γ ⊙ K) = -dr S^T and
dA_kk = -dr Ṽ^T (no matmul through W or U); dA_qk = dO Ṽ^T, d(Q ⊙ e^Γ) = dO S^T,
d(e^{Γ_C - Γ} ⊙ K) = Ṽ dS'^T; dQ, dK, dβ through the grams and the decayed factors, dΓ collected
from them (`chunk_math`), dg = the in-chunk reverse cumsum of dΓ.

Saved for backward, per group: [A_qk | Q e^Γ], T, W, [Ṽ; S] (S: one K x V matrix per chunk), [β K; Q],
e^{Γ_C - Γ} K and, for a scalar decay, the decay matrices; the backward recomputes only the elementwise
decay factors (and reads k, v, β, g again).
"""
from __future__ import annotations

import torch

from .chunk_math import (chunk_size_for, chunks, decay_factors, decay_matrix, decays, forward_groups, gram_vector,
                         gram_vector_backward, prepare, scaled, solve_unit_lower, take, tril_mask, unchunk,
                         unit_lower_inverse)

# Tokens per group of chunks: every step of a group (grams, inverse, state passing) works on about this
# many tokens of every head, so its operands stay in cache.
GROUP_TOKENS = 256


def _state_passing(S, W, U, kdT, d, VS):
    """The loop over the n chunks of a group: Ṽ = U - W S, S <- d ⊙ S + kd^T Ṽ. W `(n, BH, C, K)`,
    U `(n, BH, C, V)`, kdT `(n, BH, K, C)` (in the matmul dtype), d None or `(n, BH, K or 1, 1)`, S `(BH, K, V)`
    (compute dtype). Writes [Ṽ; S entering the chunk] into VS `(n, BH, C + K, V)` (matmul dtype) and returns
    the state after the last chunk."""
    n, C = W.shape[0], W.shape[2]
    dl = [None] * n if d is None else d.unbind(0)
    for i in range(n):
        VS[i, :, C:] = S
        if W.dtype == S.dtype:
            v_new = torch.baddbmm(U[i], W[i], S, alpha=-1.0)                          # Ṽ = U - W S
            S = torch.baddbmm(S if dl[i] is None else S * dl[i], kdT[i], v_new)
        else:                                                          # low-precision operands, fp32 state
            v_new = (U[i].to(S.dtype) - (W[i] @ S.to(W.dtype)).to(S.dtype)).to(W.dtype)
            S = (kdT[i] @ v_new).to(S.dtype) + (S if dl[i] is None else S * dl[i])
        VS[i, :, :C] = v_new
    return S


def _state_passing_backward(dS, dV_in, dS_o, WT, kd, d):
    """Adjoint of `_state_passing`, a reverse loop: dṼ = dV_in + kd dS',  dS = dS_o + d ⊙ dS' - W^T dṼ.
    dV_in `(n, BH, C, V)`, dS_o `(n, BH, K, V)`, WT `(n, BH, K, C)`, kd `(n, BH, C, K)` (matmul dtype), d None or
    `(n, BH, K or 1, 1)`, dS the cotangent of the state after the last chunk (compute dtype).
    Returns (dṼ, dS' for each chunk, dS before the first), in the compute dtype."""
    n = WT.shape[0]
    dl = [None] * n if d is None else d.unbind(0)
    dVn, dSn = [None] * n, [None] * n
    fp = WT.dtype == dS.dtype
    for i in reversed(range(n)):
        dSn[i] = dS
        carry = dS_o[i] + dS if dl[i] is None else torch.addcmul(dS_o[i].to(dS.dtype), dS, dl[i])
        if fp:
            dv_i = torch.baddbmm(dV_in[i], kd[i], dS)
            dS = torch.baddbmm(carry, WT[i], dv_i, alpha=-1.0)
        else:
            dv_i = dV_in[i].to(dS.dtype) + (kd[i] @ dS.to(kd.dtype)).to(dS.dtype)
            dS = carry - (WT[i] @ dv_i.to(WT.dtype)).to(dS.dtype)
        dVn[i] = dv_i
    return torch.stack(dVn), torch.stack(dSn), dS


def _grams(Y, k, G, E, AQ):
    """Decayed grams of the rows Y = [β K, Q] `(M, 1 + Gq, C, K)` against k `(M, C, K)` (both in the matmul
    dtype; G, E in the compute dtype): returns A_kk (strictly lower `(M, C, C)`) and writes A_qk into
    `AQ[..., :C]` (AQ `(M, Gq, C, C + K)`, matmul dtype)."""
    M, R, C, K = Y.shape
    A_qk = AQ[..., :C]
    if G is not None and G.dim() == 3:
        A = gram_vector(Y.transpose(0, 1).to(G.dtype), k.to(G.dtype), G, k.dtype)   # (1 + Gq, M, C, C)
        A_qk.copy_(A[1:].transpose(0, 1))
        return A[0].tril(-1)
    A = (Y.view(M, R * C, K) @ k.transpose(1, 2)).view(M, R, C, C)
    if E is None:
        torch.mul(A[:, 1:], tril_mask(C, A.device).to(A.dtype), out=A_qk)
        return A[:, 0].tril(-1)
    torch.mul(A[:, 1:], E[:, None], out=A_qk)
    A_kk = A[:, 0] * E                                                  # lower triangle: zero the diagonal
    A_kk.diagonal(dim1=-2, dim2=-1).zero_()
    return A_kk


def _rows(q, k, b, dtype):
    """Y = [β K, Q] `(M, 1 + Gq, C, K)` in `dtype`: the rows of both grams."""
    M, Gq, C, K = q.shape
    Y = torch.empty(M, 1 + Gq, C, K, dtype=dtype, device=q.device)
    torch.mul(k, b[:, :, None], out=Y[:, 0])
    Y[:, 1:] = q
    return Y


def _delta_group(q, k, v, b, G, S, save=True):
    """One group of n chunks, chunk-major: q `(n, BH, Gq, C, K)`, k `(n, BH, C, K)`, v `(n, BH, C, V)` in the
    matmul dtype; b `(n, BH, C)`, G None | `(n, BH, C)` | `(n, BH, C, K)` and S `(BH, K, V)` (the state before
    the group) in the compute dtype. Flattened inside to M = n * BH matrices. The output is one matmul,
    O = [A_qk | Q e^Γ] [Ṽ; S] (the two factors are built side by side and kept for the backward).
    Returns (o `(n, BH, Gq * C, V)`, S, saved = ([A_qk | Q e^Γ], T, W, [Ṽ; S], E, [β K; Q], e^{Γ_C - Γ} K)).
    With `save=False` and fp32 / fp64 matmuls (inference) T is not formed: block forward substitution is
    cheaper than the inverse, which only the backward needs."""
    n, BH, Gq, C, K = q.shape
    V = v.shape[-1]
    M = n * BH
    md = q.dtype
    q, k, v, b = q.reshape(M, Gq, C, K), k.reshape(M, C, K), v.reshape(M, C, V), b.reshape(M, C)
    G = None if G is None else G.reshape(M, *G.shape[2:])
    eG, eL, d = decays(G)
    E = decay_matrix(G) if G is not None and G.dim() == 2 else None
    Y = _rows(q, k, b, md)
    AQ = torch.empty(M, Gq, C, C + K, dtype=md, device=q.device)                   # [A_qk | Q e^Γ]
    A_kk = _grams(Y, k, G, E, AQ).to(S.dtype)
    R = torch.empty(M, C, K + V, dtype=md, device=q.device)                        # [β e^Γ K, β V]
    if eG is None:
        R[..., :K] = Y[:, 0]
        AQ[..., C:] = q
    else:
        torch.mul(Y[:, 0], eG, out=R[..., :K])
        torch.mul(q, eG[:, None], out=AQ[..., C:])
    torch.mul(v, b[:, :, None], out=R[..., K:])
    if save or md != S.dtype:           # explicit T: the backward's transposed solve is then one matmul
        T = unit_lower_inverse(A_kk).to(md)
        X = (T @ R).view(n, BH, C, K + V)                                          # [W, U]
    else:
        T, X = None, solve_unit_lower(A_kk, R).view(n, BH, C, K + V)
    kd = scaled(k, eL, md)
    VS = torch.empty(n, BH, C + K, V, dtype=md, device=q.device)                   # [Ṽ; S] per chunk
    S = _state_passing(S, X[..., :K], X[..., K:], kd.view(n, BH, C, K).transpose(-1, -2),
                       None if d is None else d.view(n, BH, *d.shape[1:]), VS)
    VS = VS.view(M, C + K, V)
    o = AQ.view(M, Gq * C, C + K) @ VS
    return o.view(n, BH, Gq * C, V), S, (AQ, T, X.view(M, C, K + V)[..., :K], VS, E, Y, kd)


def _delta_group_backward(k, v, b, G, saved, do, dS):
    """Backward of `_delta_group` for do `(n, BH, Gq * C, V)` (matmul dtype) and dS (cotangent of the state
    after the group). Returns (dq, dk, dv, dβ, dΓ or None) chunk-major `(n, BH, ...)` in the compute dtype,
    and the cotangent of the state before the group."""
    AQ, T, W, VS, E, Y, kd = saved
    n, BH, C, K = k.shape
    V = v.shape[-1]
    M = n * BH
    Gq = Y.shape[1] - 1
    md, cd = k.dtype, dS.dtype
    q, k, v, b = Y[:, 1:], k.reshape(M, C, K), v.reshape(M, C, V), b.reshape(M, C)
    G = None if G is None else G.reshape(M, *G.shape[2:])
    do = do.reshape(M, Gq * C, V)
    eG, eL, d = decays(G)
    dVS = AQ.view(M, Gq * C, C + K).transpose(1, 2) @ do                          # [A_qk^T dO; (Q e^Γ)^T dO]
    dVn, dSn, dS = _state_passing_backward(dS, dVS[:, :C].view(n, BH, C, V), dVS[:, C:].view(n, BH, K, V),
                                           W.view(n, BH, C, K).transpose(-1, -2), kd.view(n, BH, C, K),
                                           None if d is None else d.view(n, BH, *d.shape[1:]))
    dVn, dSn = dVn.view(M, C, V), dSn.view(M, K, V)
    Vn, prev = VS[:, :C], VS[:, C:]
    dr = T.transpose(1, 2) @ dVn.to(md)                                            # (M, C, V)
    Y2 = torch.empty(M, 1 + Gq, C, V, dtype=md, device=q.device)                   # [-dr, dO]
    torch.neg(dr, out=Y2[:, 0])
    Y2[:, 1:] = do.view(M, Gq, C, V)
    ZP = (Y2.view(M, (1 + Gq) * C, V) @ VS.transpose(1, 2)).view(M, 1 + Gq, C, C + K)
    Z, P = ZP[..., :C], ZP[..., C:]        # [dA_kk, dA_qk] (unmasked), [d(β e^Γ K), d(Q e^Γ)]
    dSn_m = dSn.to(md)
    dkd = Vn @ dSn_m.transpose(1, 2)                                              # d(e^{Γ_C - Γ} K)
    dkg, dqd = P[:, 0], P[:, 1:]
    if G is not None and G.dim() == 3:
        Z = Z.tril()
        Z[:, 0].diagonal(dim1=-2, dim2=-1).zero_()
        rows, dk_col = gram_vector_backward(Y.transpose(0, 1).to(cd), k.to(cd), G, Z.transpose(0, 1).to(cd), md)
        d_kb, dq = rows[0], rows[1:].transpose(0, 1)
    else:
        Z = Z.tril() if E is None else scaled(Z, E[:, None], md)
        Z[:, 0].diagonal(dim1=-2, dim2=-1).zero_()
        Z = Z.view(M, (1 + Gq) * C, C)
        rows = (Z @ k).view(M, 1 + Gq, C, K)
        dk_col = Z.transpose(1, 2) @ Y.view(M, (1 + Gq) * C, K)
        d_kb, dq = rows[:, 0], rows[:, 1:]
    shape = lambda x: x.view(n, BH, *x.shape[1:])  # noqa: E731
    dv = dr * b[:, :, None]                                                        # compute dtype (b's)
    if G is None:
        d_row = d_kb.to(cd) + dkg                                      # d(β k): the gram's rows and kg = β k
        dk = torch.addcmul(dk_col.to(cd) + dkd, d_row, b[:, :, None])
        db = (k * d_row).sum(-1) + (dr * v).sum(-1, dtype=cd)
        return shape(dq + dqd.to(cd)), shape(dk), shape(dv), shape(db), None, dS
    dq = torch.addcmul(dq.to(cd), dqd, eG[:, None])
    d_row = torch.addcmul(d_kb.to(cd), dkg, eG)                       # d(β k): gram rows and kg = β e^Γ k
    dk_b = d_row * b[:, :, None]
    dk_c = torch.addcmul(dk_col.to(cd), dkd, eL)                      # gram columns and kd = e^{Γ_C - Γ} k
    db = (k * d_row).sum(-1) + (dr * v).sum(-1, dtype=cd)
    # dΓ = Σ_q q dq + (β k) d_kb + kg dkg - k dk_col - kd dkd, plus the chunk-end terms
    dG = (q * dq).sum(1) + k * (dk_b - dk_c)
    last = (kd * dkd).sum(-2, dtype=cd) + (prev * dSn).sum(-1) * d[..., 0]          # (M, K) or (M, 1)
    if G.dim() == 2:
        dG = dG.sum(-1)
        dG[:, -1] += last.sum(-1)
    else:
        dG[:, -1, :] += last
    return shape(dq), shape(dk_b + dk_c), shape(dv), shape(db), shape(dG), dS


def _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md, save):
    """The engine on chunk-major tensors (q, k, v cast to the matmul dtype md; beta, g, the state in the compute
    dtype): returns (o in q's dtype, S_N, saved or None, dims)."""
    B, H, Gq, N, K = q.shape
    V = v.shape[-1]
    C = chunk_size_for(N, chunk_size)
    md = md or q.dtype
    qv, kv, vv, bv = chunks(q, C, time_dim=3), chunks(k, C), chunks(v, C), chunks(beta, C)   # (NC, BH, ..., C, .)
    gv = None if g is None else chunks(g, C)
    S = beta.new_zeros(B * H, K, V) if initial_state is None else initial_state.reshape(B * H, K, V)
    out = q.new_empty(B, H, Gq, qv.shape[0] * C, V)
    S, saved = forward_groups(lambda sl, S: _delta_group(*_group_inputs(qv, kv, vv, bv, gv, sl, md, scale), S, save),
                              out, C, max(1, GROUP_TOKENS // C), S, save)
    return (out.narrow(3, 0, N), S.reshape(B, H, K, V), ((qv, kv, vv, bv, gv), saved) if save else None,
            (B, H, Gq, N, K, V, C))


def _group_inputs(qv, kv, vv, bv, gv, sl, md, scale):
    """The group's operands, contiguous: q (times scale; None if qv is), k, v in the matmul dtype; beta,
    Γ = the in-chunk cumsum of g."""
    return (None if qv is None else take(qv[sl], md, scale), take(kv[sl], md), take(vv[sl], md), take(bv[sl]),
            None if gv is None else torch.cumsum(gv[sl], 2).contiguous())


class _DeltaChunk(torch.autograd.Function):
    """The delta engine with its hand-written backward (gradients of q, k, v, beta, g, the initial state)."""

    @staticmethod
    def forward(ctx, q, k, v, beta, g, initial_state, scale, chunk_size, md):
        o, S, (inputs, per_group), dims = _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md, True)
        ctx.save_for_backward(*inputs)
        ctx.per_group = per_group      # intermediates of each group (not inputs or outputs: kept on ctx, no copy)
        ctx.dims, ctx.scale, ctx.dtypes = dims, scale, (q.dtype, k.dtype, v.dtype)
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        qv, kv, vv, bv, gv = ctx.saved_tensors
        per_group, ctx.per_group = ctx.per_group, None
        B, H, Gq, N, K, V, C = ctx.dims
        md = per_group[0][0].dtype
        dov = chunks(do, C, time_dim=3)
        dS = dS.reshape(B * H, K, V).to(bv.dtype)
        n = max(1, GROUP_TOKENS // C)
        NC = qv.shape[0]
        (tq, tk, tv), new = ctx.dtypes, bv.new_empty
        dq, dk, dv = new(B, H, Gq, NC * C, K, dtype=tq), new(B, H, NC * C, K, dtype=tk), new(B, H, NC * C, V, dtype=tv)
        db = new(B, H, NC * C)
        dg = None if gv is None else new(B, H, NC * C, *gv.shape[3:])
        dests = [chunks(dq, C, time_dim=3), chunks(dk, C), chunks(dv, C), chunks(db, C),
                 None if dg is None else chunks(dg, C)]
        for j in reversed(range(len(per_group))):
            sl = slice(j * n, (j + 1) * n)
            *grads, dS = _delta_group_backward(*_group_inputs(None, kv, vv, bv, gv, sl, md, ctx.scale)[1:],
                                               per_group[j], take(dov[sl], md).view(-1, B * H, Gq * C, V), dS)
            per_group[j] = None
            dqg, dkg, dvg, dbg, dGg = grads
            torch.mul(dqg, ctx.scale, out=dests[0][sl])
            dests[1][sl], dests[2][sl], dests[3][sl] = dkg, dvg, dbg
            if dGg is not None:
                dests[4][sl] = dGg.flip(2).cumsum(2).flip(2)                   # dg: in-chunk reverse cumsum
        dq, dk, dv, db = dq.narrow(3, 0, N), dk.narrow(2, 0, N), dv.narrow(2, 0, N), db.narrow(2, 0, N)
        dg = None if dg is None else dg.narrow(2, 0, N)
        dS0 = dS.reshape(B, H, K, V) if ctx.needs_input_grad[5] else None
        return dq, dk, dv, db, dg, dS0, None, None, None


# ------------------------------------------------------------------------ autograd path (the oracle)

def _delta_group_prepare(qc, kc, vc, bc, G):
    """The state-independent part of one group of the previous engine (grams, block forward substitution;
    layout `(BH, n, ...)`), kept as the autograd path: differentiated by autograd it is the oracle of the
    hand-written backward and the timing baseline. qc `(BH, n, Gq, C, K)`, kc `(BH, n, C, K)`, vc
    `(BH, n, C, V)`, bc `(BH, n, C)`, G None | `(BH, n, C)` | `(BH, n, C, K)`. Returns `(W, U, A_qk, qd, kdT, d)`,
    each with the BH rows first."""
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
    return W, U, A_qk, qd, kdT, d


def _delta_group_scan(prep, S):
    """The state passing through one prepared group: S `(BH, K, V)` before it -> (its n outputs
    `(BH, Gq * C, V)`, S after it)."""
    W, U, A_qk, qd, kdT, d = prep
    n = W.shape[1]
    outs = []
    per_chunk = zip(W.unbind(1), U.unbind(1), A_qk.unbind(1), qd.unbind(1), kdT.unbind(1),
                    d.unbind(1) if d is not None else [None] * n)
    for W_i, U_i, A_i, qd_i, kdT_i, d_i in per_chunk:
        v_new = torch.baddbmm(U_i, W_i, S, alpha=-1.0)                # Ṽ = U - W S
        outs.append(torch.baddbmm(A_i @ v_new, qd_i, S))              # O = A_qk Ṽ + (Q ⊙ e^Γ) S
        S = torch.baddbmm(S if d_i is None else S * d_i, kdT_i, v_new)
    return outs, S


def _delta_inputs(q, k, v, beta, scale, g, initial_state, chunk_size):
    """Padded, chunked inputs flattened to (batch x head) rows: (shape, S `(BH, K, V)`, an iterator over
    the groups' `(qc, kc, vc, bc, G)`)."""
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, (bc,) = prepare(q, k, v, scale, g, initial_state, chunk_size,
                                                              extra=(beta,))
    NC = kc.shape[2]

    def flat(x):
        return None if x is None else x.reshape(B * H, NC, *x.shape[3:])

    qc, kc, vc, bc, G = flat(qc), flat(kc), flat(vc), flat(bc), flat(G)
    n = max(1, GROUP_TOKENS // C)
    # split (not slicing in the loop): the backward of one split is one concatenation, whereas each
    # slice's backward would materialize a zero tensor of the full length (quadratic in N).
    groups = zip(*(x.split(n, 1) for x in (qc, kc, vc, bc)), G.split(n, 1) if G is not None else [None] * NC)
    return (B, H, Gq, N, K, V, C, NC), S.reshape(B * H, K, V), groups


def delta_prepare(q, k, v, beta, scale: float, g=None, chunk_size: int = 64):
    """Phase 1 of the autograd path of `chunk_delta` (same arguments, no state): every group's
    state-independent tensors, for a state scan run later, e.g. in blocks of (batch, head) rows while the
    entering state arrives from another process (`anyattn.distributed`'s pipeline). Returns `(shape, groups)`;
    memory: the prepared tensors of the whole sequence. Differentiated by autograd."""
    shape, _, groups = _delta_inputs(q, k, v, beta, scale, g, None, chunk_size)
    return shape, [_delta_group_prepare(*grp) for grp in groups]


def delta_scan(groups, S, rows: slice | None = None):
    """Phase 2: the state passing through prepared `groups` (from `delta_prepare`) for the flattened
    (batch, head) rows `rows` (None: all), from S `(rows, K, V)`. Returns (o `(rows, NC, Gq * C, V)`, S after
    the last token)."""
    outs = []
    for prep in groups:
        if rows is not None:
            prep = tuple(None if x is None else x[rows] for x in prep)
        o, S = _delta_group_scan(prep, S)
        outs += o
    return torch.stack(outs, 1), S


def delta_finish(shape, o):
    """Phase 3: the scanned outputs of every row `(B * H, NC, Gq * C, V)` -> `(B, H, Gq, N, V)`."""
    B, H, Gq, N, K, V, C, NC = shape
    return unchunk(o.view(B, H, NC, Gq * C, V), B, H, Gq, C, N)


def _forward_autograd(q, k, v, beta, scale, g, initial_state, chunk_size):
    shape, S, groups = _delta_inputs(q, k, v, beta, scale, g, initial_state, chunk_size)
    outs = []
    for grp in groups:
        o, S = _delta_group_scan(_delta_group_prepare(*grp), S)
        outs += o
    B, H, K, V = shape[0], shape[1], shape[4], shape[5]
    return delta_finish(shape, torch.stack(outs, 1)), S.reshape(B, H, K, V)


def chunk_delta(q, k, v, beta, scale: float, g=None, initial_state=None, chunk_size: int = 64, *,
                md=None, autograd: bool = False):
    """Delta-rule family. q `(B, H, Gq, N, K)` (Gq query heads per key head), k `(B, H, N, K)`,
    v `(B, H, N, V)`, beta `(B, H, N)`, g None (DeltaNet) | `(B, H, N)` (Gated DeltaNet) |
    `(B, H, N, K)` (KDA), initial_state `(B, H, K, V)` or None. beta, g and the state are in the compute dtype
    (fp32 / fp64); q, k, v in any float dtype: md is the dtype of the matmul operands
    (`chunk_math.matmul_dtype`; None: q's), the output comes back in q's dtype. Returns `(o (B, H, Gq, N, V), S_N)`,
    differentiable in every tensor input by the hand-written backward; `autograd=True` runs the previous
    engine (block forward substitution) differentiated by autograd instead: the gradient oracle of the
    tests and the timing baseline (md ignored)."""
    if autograd:
        return _forward_autograd(q, k, v, beta, scale, g, initial_state, chunk_size)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, beta, g, initial_state)):
        return _DeltaChunk.apply(q, k, v, beta, g, initial_state, scale, chunk_size, md)
    return _forward(q, k, v, beta, scale, g, initial_state, chunk_size, md, save=False)[:2]
