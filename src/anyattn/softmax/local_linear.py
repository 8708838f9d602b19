"""Local Linear Attention (Zuo et al., 2025, "Local Linear Attention: An Optimal Interpolation of Linear
and Softmax Attention for Test-Time Regression").

Per query i, with w_ij = exp(scale q_i . k_j - m_i) over its allowed keys and d_j = k_j - q_i:

    ω = sum w,  μ = sum w d,  M2 = sum w d d^T + λ ω I,  ρ = M2^{-1} μ,
    o_i = sum_j w_ij (1 - ρ . d_j) v_j / (ω - μ . ρ)

a locally linear (instead of locally constant, as softmax) kernel regression of v on k at the point q;
λ -> infinity gives softmax attention. `mode="dense"` computes exactly this (one D x D solve per query,
O(N^2) memory): the oracle, and fast for small N.

`mode="blocked"` uses the same function rewritten with the softmax probabilities p = w / ω,
ō = sum p v, k̄ = sum p k, A = Cov_p(k) + λ I = sum p k k^T - k̄ k̄^T + λ I (Sherman-Morrison on
M2 / ω = A + u u^T, u = k̄ - q):

    z = A^{-1} (k̄ - q),   o = ō (1 + z . k̄) - sum_j p_j (z . k_j) v_j

(the local regression `ō + Cov_p(v, k) A^{-1} (q - k̄)`). Every sum over keys is a flash-style sweep
over the tiles of `anyattn.softmax.tiling` (tiles the mask empties are skipped), recomputing p from the
LSE: one blocked-attention pass for ō, k̄, sum p k^2 and the LSE; `cg_iters` sweeps of preconditioned
conjugate gradient for z (each matvec `A x = sum p k (k . x) - k̄ (k̄ . x) + λ x` is one sweep; Jacobi
preconditioner diag(A) from the first pass); one sweep for the output. Memory O(N D) forward and
backward. The backward (hand-written) solves the adjoint system `A g = dz` by the same conjugate
gradient and makes one more sweep for rvec = sum p (do . v) k and one for the gradients (implicit
differentiation of the solve: the gradient of the exact solution at the computed z).
"""
from __future__ import annotations

import math

import torch

from ..lse import NEG_INF, exp_shifted_, finite_or_zero
from ..masks import Causal
from ..validate import check_positive_int, check_qkv, check_scale
from .tiling import make_plan, q_tile, scores

MODES = ("auto", "dense", "blocked")
# mode="auto" uses the dense form up to this many (query, key) pairs per head.
DENSE_MAX_PAIRS = 512 * 512
DEFAULT_CG_ITERS = 16
# Query rows per tile of the blocked form: a tile holds its probabilities over all its keys.
DEFAULT_BLOCK_Q = 64
# Default early stop of the conjugate gradient: relative residual per compute dtype (fp32: near the
# precision the rest of the computation reaches; about 10 iterations on normal random inputs, D = 64).
DEFAULT_CG_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ------------------------------------------------------------------------------------------- dense

def _dense(q, k, v, lam: float, scale: float, causal: bool):
    """The definition, per query: q `(B, H, N_q, D)`, k, v `(B, H, N_k, .)` (heads already matched)."""
    Nq, Nk, D = q.shape[2], k.shape[2], q.shape[-1]
    s = scale * q @ k.transpose(-1, -2)
    if causal:
        allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=q.device).tril(Nk - Nq)
        s = s.masked_fill(~allowed, NEG_INF)
    m = finite_or_zero(s.amax(-1, keepdim=True))
    w = torch.exp(s - m)
    omega = w.sum(-1)
    a = w @ k                                                                # sum w k
    kk = (w @ (k[..., :, None] * k[..., None, :]).flatten(-2)).unflatten(-1, (D, D))   # sum w k k^T
    mu = a - omega[..., None] * q
    eye = torch.eye(D, dtype=q.dtype, device=q.device)
    M2 = (kk - a[..., :, None] * q[..., None, :] - q[..., :, None] * a[..., None, :]
          + omega[..., None, None] * (q[..., :, None] * q[..., None, :] + lam * eye))
    empty = omega == 0
    M2 = torch.where(empty[..., None, None], eye, M2)
    rho = torch.linalg.solve(M2, mu[..., None])[..., 0]
    wv = w @ v
    num = wv - (w * (rho @ k.transpose(-1, -2))) @ v + (rho * q).sum(-1, keepdim=True) * wv
    den = omega - (mu * rho).sum(-1)
    return torch.where(empty[..., None], torch.zeros_like(num), num / torch.where(empty, 1.0, den)[..., None])


# ----------------------------------------------------------------------------------------- blocked

def _cg(matvec, b, diag, iters: int, tol: float):
    """Preconditioned conjugate gradient for `A x = b`, one system per row (last dim), A symmetric positive
    definite given by `matvec`; Jacobi preconditioner `diag`. Stops after `iters` matvecs or when every
    relative residual is below `tol`. Returns (x, relative residual |r| / |b| per row)."""
    x = torch.zeros_like(b)
    r = b.clone()
    bn = b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    zr = r / diag
    p = zr
    rz = (r * zr).sum(-1, keepdim=True)
    for _ in range(iters):
        if tol > 0 and float((r.norm(dim=-1) / bn).max()) <= tol:
            break
        Ap = matvec(p)
        pAp = (p * Ap).sum(-1, keepdim=True)
        alpha = rz / torch.where(pAp == 0, torch.ones_like(pAp), pAp)
        x = x + alpha * p
        r = r - alpha * Ap
        zr = r / diag
        rz_new = (r * zr).sum(-1, keepdim=True)
        p = zr + (rz_new / torch.where(rz == 0, torch.ones_like(rz), rz)) * p
        rz = rz_new
    return x, r.norm(dim=-1) / bn


def _tiles(plan):
    """(q0, q1, lo, hi, needs_mask) for every query tile with keys: its whole key span at once."""
    masked = plan.mask is not None
    for q0, span in zip(range(0, plan.shape.N_q, plan.block_q), plan.spans):
        if span.hi > span.lo:
            partial = masked and not (span.full_lo <= span.lo and span.hi <= span.full_hi)
            yield q0, min(q0 + plan.block_q, plan.shape.N_q), span.lo, span.hi, partial


def _probs(plan, qt, k, q0, q1, lo, hi, needs_mask, lse=None):
    """Softmax probabilities of a query tile over its key span `(B, H_kv, G*Tq, hi - lo)` and the rows'
    LSE (recomputed from the saved `lse`, where -inf rows were set to +inf, when given)."""
    s, allowed = scores(plan, qt, k, q0, q1, lo, hi, needs_mask, ())
    if lse is not None:
        return exp_shifted_(s, lse, False, allowed), lse
    m = finite_or_zero(s.amax(-1, keepdim=True))
    p = exp_shifted_(s, m, False, allowed)
    l = p.sum(-1, keepdim=True)
    empty = l == 0
    p = p / torch.where(empty, torch.ones_like(l), l)
    return p, torch.where(empty, torch.full_like(l, NEG_INF), m + torch.log(l))


def _matvec(p, ks, kbar, lam):
    """x -> A x = sum_j p_j k_j (k_j . x) - k̄ (k̄ . x) + λ x for the rows of one query tile."""
    def mv(x):
        return torch.matmul(p * torch.matmul(x, ks.transpose(-1, -2)), ks) - kbar * (kbar * x).sum(-1, keepdim=True) + lam * x
    return mv


def _rows_of(x, q0, q1):
    return q_tile(x, q0, q1, 1.0)


def _put(dst, q0, q1, x):
    B, Hkv, G = dst.shape[:3]
    dst[:, :, :, q0:q1] = x.view(B, Hkv, G, q1 - q0, *x.shape[3:])


class _BlockedLLA(torch.autograd.Function):
    """Query tile by query tile (all heads at once): the tile's probabilities over its key span are
    formed once `(G * block_q, N_k)` and serve the first moments, every CG matvec and the output."""

    @staticmethod
    def forward(ctx, plan, lam, iters, tol, q, k, v):
        sh = plan.shape
        D, Dv = sh.D, sh.D_v
        qg = q.unflatten(1, (sh.H_kv, sh.groups))
        vkk = torch.cat([v, k, k * k], -1)
        shape = (sh.B, sh.H_kv, sh.groups, sh.N_q)
        out, obar, kbar, z = (q.new_zeros(*shape, d) for d in (Dv, Dv, D, D))
        diag = q.new_full((*shape, D), lam)
        lse = q.new_full((*shape, 1), NEG_INF)
        residual = q.new_zeros(*shape, 1)
        for q0, q1, lo, hi, partial in _tiles(plan):
            p, lt = _probs(plan, q_tile(qg, q0, q1, plan.scale), k, q0, q1, lo, hi, partial)
            ks = k[:, :, lo:hi]
            ob, kb, k2 = torch.matmul(p, vkk[:, :, lo:hi]).split([Dv, D, D], -1)
            dg = (k2 - kb * kb).clamp_min(0) + lam
            zt, res = _cg(_matvec(p, ks, kb, lam), kb - _rows_of(qg, q0, q1), dg, iters, tol)
            ot = ob * (1 + (zt * kb).sum(-1, keepdim=True)) - torch.matmul(p * torch.matmul(zt, ks.transpose(-1, -2)),
                                                                          v[:, :, lo:hi])
            for dst, x in ((out, ot), (obar, ob), (kbar, kb), (z, zt), (diag, dg), (lse, lt), (residual, res[..., None])):
                _put(dst, q0, q1, x)
        ctx.plan, ctx.lam, ctx.iters, ctx.tol = plan, lam, iters, tol
        ctx.save_for_backward(q, k, v, lse, obar, kbar, diag, z)
        ctx.mark_non_differentiable(residual)
        return out.flatten(1, 2), residual[..., 0].flatten(1, 2)

    @staticmethod
    def backward(ctx, dout, _dres):
        plan, lam = ctx.plan, ctx.lam
        sh = plan.shape
        q, k, v, lse, obar, kbar, diag, z = ctx.saved_tensors
        G = sh.groups
        qg, do = q.unflatten(1, (sh.H_kv, G)), dout.unflatten(1, (sh.H_kv, G))
        lse = torch.where(lse == NEG_INF, torch.full_like(lse, math.inf), lse)
        dq, dk, dv = torch.zeros_like(qg), torch.zeros_like(k), torch.zeros_like(v)
        for q0, q1, lo, hi, partial in _tiles(plan):
            qt = q_tile(qg, q0, q1, plan.scale)
            ob, kb, dg, zt, dot, lt = (_rows_of(x, q0, q1) for x in (obar, kbar, diag, z, do, lse))
            p, _ = _probs(plan, qt, k, q0, q1, lo, hi, partial, lt)
            ks, vs = k[:, :, lo:hi], v[:, :, lo:hi]
            a = (dot * ob).sum(-1, keepdim=True)                              # do . ō
            zkb = (zt * kb).sum(-1, keepdim=True)
            c = 1 + zkb
            e = torch.matmul(dot, vs.transpose(-1, -2))                       # do . v_j
            rvec = torch.matmul(p * e, ks)                                    # sum p e k
            g, _ = _cg(_matvec(p, ks, kb, lam), a * kb - rvec, dg, ctx.iters, ctx.tol)   # A g = dz
            gkb = (g * kb).sum(-1, keepdim=True)
            dkb = zt * (a + gkb) + c * g                                      # d k̄
            u = kb - _rows_of(qg, q0, q1)
            delta = (c * a - (zt * rvec).sum(-1, keepdim=True)
                     - ((g * u).sum(-1, keepdim=True) - lam * (g * zt).sum(-1, keepdim=True) + gkb * zkb)
                     + (dkb * kb).sum(-1, keepdim=True))
            n = qt.shape[-2]
            zk, gk, dkk = torch.matmul(torch.cat([zt, g, dkb], -2), ks.transpose(-1, -2)).split(n, -2)
            ds = p * (c * e - zk * e - gk * zk + dkk - delta)
            _put(dq, q0, q1, torch.matmul(ds, ks) * plan.scale - g)
            w = torch.cat([ds, -p * (e + gk), -p * zk, p], -2)                # against [q scale; z; g; d k̄]
            dk[:, :, lo:hi] += torch.matmul(w.transpose(-1, -2), torch.cat([qt, zt, g, dkb], -2))
            dv[:, :, lo:hi] += torch.matmul((p * (c - zk)).transpose(-1, -2), dot)
        return None, None, None, None, dq.flatten(1, 2), dk, dv


# ------------------------------------------------------------------------------------------ public

def local_linear_attention(q, k, v, *, lam: float = 10.0, scale=None, is_causal: bool = True, mode: str = "auto",
                           cg_iters: int = DEFAULT_CG_ITERS, cg_tol: float | None = None, return_residual: bool = False,
                           block_q: int = DEFAULT_BLOCK_Q):
    """Local Linear Attention (see the module docstring). q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`,
    v `(B, H_kv, N_k, D_v)` (grouped-query heads; causal aligns bottom-right).

    lam: the ridge λ > 0 (relative to the kernel mass ω). scale multiplies q k^T in the weights (default
    D^-0.5; the offsets k_j - q_i are unscaled). mode: "dense" (the exact per-query solve, O(N^2)
    memory), "blocked" (O(N (D + block_q)) memory: query tiles of `block_q` rows; conjugate gradient with
    at most `cg_iters` iterations, stopping early once every relative residual is below `cg_tol`, by
    default 1e-5 for fp32 / bf16 / fp16 and 1e-12 for fp64; 0: always `cg_iters`), "auto" (dense up to
    512 x 512 (query, key) pairs per head). return_residual: also return the relative CG residual
    `|u - A z| / |u|` per query `(B, H, N_q)` (zeros for dense). Returns o `(B, H, N_q, D_v)` in q's dtype
    (computed in at least fp32), differentiable in q, k, v. A query with no allowed key returns 0."""
    shape = check_qkv(q, k, v)
    scale = check_scale(scale, shape.D)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
        raise ValueError(f"lam must be a finite float > 0, got {lam!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_positive_int("cg_iters", cg_iters)
    if cg_tol is None:
        cg_tol = DEFAULT_CG_TOL[torch.float64 if q.dtype == torch.float64 else torch.float32]
    if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not cg_tol >= 0:
        raise ValueError(f"cg_tol must be a float >= 0 or None, got {cg_tol!r}")
    check_positive_int("block_q", block_q)
    if mode == "auto":
        mode = "dense" if shape.N_q * shape.N_k <= DENSE_MAX_PAIRS else "blocked"
    work = torch.promote_types(q.dtype, torch.float32)
    q_, k_, v_ = q.to(work), k.to(work), v.to(work)
    if mode == "dense":
        G = shape.groups
        out = _dense(q_, k_.repeat_interleave(G, 1), v_.repeat_interleave(G, 1), float(lam), scale, is_causal)
        residual = out.new_zeros(shape.B, shape.H, shape.N_q)
    else:
        plan = make_plan(shape, scale, Causal() if is_causal else None, None, block_q, shape.N_k)
        out, residual = _BlockedLLA.apply(plan, float(lam), cg_iters, float(cg_tol), q_, k_, v_)
    out = out.to(q.dtype)
    return (out, residual) if return_residual else out
