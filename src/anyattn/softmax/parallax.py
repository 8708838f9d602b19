"""Parallax attention (the Local Linear Attention authors' learned-probe variant): softmax attention with a
first-order correction along a per-query probe r_i,

    s = softmax(q k^T * scale, masked),  μ̄_i = sum_j s_ij k_j,
    o_i = sum_j s_ij [1 - r_i . (k_j - μ̄_i)] v_j  =  (1 + r_i . μ̄_i) ō_i - sum_j s_ij (r_i . k_j) v_j,

with ō = s v. One blocked pass (FlashAttention-2 tiling, every mask spec, tiles skipped as in
`blocked`) with two accumulators beside ō: `sum_j p_j k_j` and `sum_j p_j (r . k_j) v_j`, all rescaled by
the same online-softmax factor. Backward recomputes each tile's probabilities from the saved LSE
(O(N) memory): with c = 1 + r.μ̄, a = do.ō, e_j = do.v_j, `dp_j = c e_j + a (r.k_j) - (r.k_j) e_j`,
`ds = p (dp - delta)`, `delta = a (r.μ̄) + do.o`, `dr = a μ̄ - sum_j p_j e_j k_j`,
`dk_j += p_j (a - e_j) r`, `dv_j += p_j (c - r.k_j) do`.
"""
from __future__ import annotations

import torch

from ..lse import NEG_INF, exp_shifted_, online_softmax_weights
from ..masks import as_mask
from ..validate import check_positive_int, check_qkv, check_scale, check_tensor
from .blocked import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
from .tiling import make_plan, q_tile, scores, segments


def _rows(x, sh, q0, q1):
    """Unscaled rows of a per-query tensor `(B, H_kv, G, N, F)` for one query tile: `(B, H_kv, G*Tq, F)`."""
    return q_tile(x, q0, q1, 1.0)


def _forward(plan, q, k, v, r):
    sh = plan.shape
    G = sh.groups
    qg, rg = q.unflatten(1, (sh.H_kv, G)), r.unflatten(1, (sh.H_kv, G))
    vk = torch.cat([v, k], -1)
    out = q.new_zeros(sh.B, sh.H_kv, G, sh.N_q, sh.D_v)
    obar = q.new_zeros(sh.B, sh.H_kv, G, sh.N_q, sh.D_v)
    kbar = q.new_zeros(sh.B, sh.H_kv, G, sh.N_q, sh.D)
    lse = q.new_full((sh.B, sh.H_kv, G, sh.N_q), NEG_INF)
    masked = plan.mask is not None
    for q0, span in zip(range(0, sh.N_q, plan.block_q), plan.spans):
        q1 = min(q0 + plan.block_q, sh.N_q)
        tq = q1 - q0
        if span.hi <= span.lo:
            continue
        qt, rt = q_tile(qg, q0, q1, plan.scale), _rows(rg, sh, q0, q1)
        rows = (sh.B, sh.H_kv, G * tq)
        m, l = q.new_full(rows, NEG_INF), q.new_zeros(rows)
        acc_vk = q.new_zeros(*rows, sh.D_v + sh.D)                       # sum p [v | k]
        acc_rv = q.new_zeros(*rows, sh.D_v)                              # sum p (r.k) v
        for k0, k1, needs_mask in segments(span, plan.block_k, masked):
            s, allowed = scores(plan, qt, k, q0, q1, k0, k1, needs_mask, ())
            rk = torch.matmul(rt, k[:, :, k0:k1].transpose(-1, -2))
            p, alpha, m, l = online_softmax_weights(s, m, l, False, allowed)
            a = alpha.unsqueeze(-1)
            acc_vk.mul_(a).add_(torch.matmul(p, vk[:, :, k0:k1]))
            acc_rv.mul_(a).add_(torch.matmul(p.mul_(rk), v[:, :, k0:k1]))
        empty = l == 0
        inv = 1.0 / torch.where(empty, torch.ones_like(l), l).unsqueeze(-1)
        ob, kb = (acc_vk * inv).split([sh.D_v, sh.D], -1)
        o = ob * (1 + (rt * kb).sum(-1, keepdim=True)) - acc_rv * inv
        sl = (slice(None), slice(None), slice(None), slice(q0, q1))
        out[sl] = o.view(sh.B, sh.H_kv, G, tq, sh.D_v)
        obar[sl] = ob.view(sh.B, sh.H_kv, G, tq, sh.D_v)
        kbar[sl] = kb.view(sh.B, sh.H_kv, G, tq, sh.D)
        lse[sl] = torch.where(empty, torch.full_like(m, NEG_INF), m + torch.log(l)).view(sh.B, sh.H_kv, G, tq)
    return out, obar, kbar, lse


def _backward(plan, q, k, v, r, out, obar, kbar, lse, dout):
    sh = plan.shape
    G = sh.groups
    split = (sh.H_kv, G)
    qg, rg, og, obg, kbg, dog = (x.unflatten(1, split) for x in (q, r, out, obar, kbar, dout))
    lse_safe = torch.where(lse == NEG_INF, torch.full_like(lse, float("inf")), lse).unflatten(1, split)
    dq, dr = torch.zeros_like(qg), torch.zeros_like(rg)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    masked = plan.mask is not None
    for q0, span in zip(range(0, sh.N_q, plan.block_q), plan.spans):
        q1 = min(q0 + plan.block_q, sh.N_q)
        tq = q1 - q0
        if span.hi <= span.lo:
            continue
        qt = q_tile(qg, q0, q1, plan.scale)
        rt, dot, ot, obt, kbt = (_rows(x, sh, q0, q1) for x in (rg, dog, og, obg, kbg))
        lt = lse_safe[:, :, :, q0:q1].reshape(sh.B, sh.H_kv, G * tq, 1)
        a = (dot * obt).sum(-1, keepdim=True)                            # do . ō
        rkb = (rt * kbt).sum(-1, keepdim=True)                           # r . μ̄
        c = 1 + rkb
        delta = a * rkb + (dot * ot).sum(-1, keepdim=True)
        qr = torch.cat([qt, rt], -2)
        dqt, pek = torch.zeros_like(qt), torch.zeros_like(rt)
        for k0, k1, needs_mask in segments(span, plan.block_k, masked):
            s, allowed = scores(plan, qt, k, q0, q1, k0, k1, needs_mask, ())
            p = exp_shifted_(s, lt, False, allowed)
            kt, vt = k[:, :, k0:k1], v[:, :, k0:k1]
            rk = torch.matmul(rt, kt.transpose(-1, -2))
            e = torch.matmul(dot, vt.transpose(-1, -2))
            pe = p * e
            ds = p * (c * e + a * rk - rk * e - delta)
            dqt += torch.matmul(ds, kt)
            pek += torch.matmul(pe, kt)
            dk[:, :, k0:k1] += torch.matmul(torch.cat([ds, p * a - pe], -2).transpose(-1, -2), qr)
            dv[:, :, k0:k1] += torch.matmul((p * (c - rk)).transpose(-1, -2), dot)
        dq[:, :, :, q0:q1] = (dqt * plan.scale).view(sh.B, sh.H_kv, G, tq, sh.D)
        dr[:, :, :, q0:q1] = (a * kbt - pek).view(sh.B, sh.H_kv, G, tq, sh.D)
    return dq.flatten(1, 2), dk, dv, dr.flatten(1, 2)


class _Parallax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, q, k, v, r):
        out, obar, kbar, lse = (x.flatten(1, 2) for x in _forward(plan, q, k, v, r))
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, r, out, obar, kbar, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return (None, *_backward(ctx.plan, *ctx.saved_tensors, dout))


def parallax_attention(q, k, v, r, *, mask=None, scale=None, block_q: int = DEFAULT_BLOCK_Q,
                       block_k: int = DEFAULT_BLOCK_K):
    """Parallax attention (see the module docstring). q, r `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`,
    v `(B, H_kv, N_k, D_v)` (grouped-query heads as in `anyattn.attention`); mask: any `anyattn.masks`
    spec, bool tensor or mask_mod (causal aligns bottom-right); scale multiplies q k^T (default D^-0.5);
    r is used unscaled. A query with no allowed key returns 0. Returns o `(B, H, N_q, D_v)` in q's dtype
    (computed in at least fp32); differentiable in q, k, v and r with O(N) memory."""
    shape = check_qkv(q, k, v)
    check_tensor("r", r, 4)
    if r.dtype != q.dtype or r.device != q.device:
        raise ValueError(f"r must have q's dtype {q.dtype} and device {q.device}, got {r.dtype} on {r.device}")
    if tuple(r.shape) != tuple(q.shape):
        raise ValueError(f"r must have q's shape (B, H, N_q, D) = {tuple(q.shape)}, got {tuple(r.shape)}")
    scale = check_scale(scale, shape.D)
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    mask = as_mask(mask)
    if mask is not None:
        mask.validate(shape.B, shape.H, shape.N_q, shape.N_k, q.device)
    plan = make_plan(shape, scale, mask, None, block_q, block_k)
    work = torch.promote_types(q.dtype, torch.float32)
    out = _Parallax.apply(plan, q.to(work), k.to(work), v.to(work), r.to(work))
    return out.to(q.dtype)
