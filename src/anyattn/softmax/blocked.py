"""Blocked exact attention: the FlashAttention-2 algorithm in PyTorch ops (METHODS.md "Blocked").

Online softmax over query tiles (`block_q`) and key tiles (`block_k`); the backward pass recomputes
probabilities tile by tile from the saved LSE. No `N_q x N_k` tensor is stored or materialized in
forward or backward: memory is O((N_q + N_k) D) plus one `(block_q, block_k)` tile per head. Key tiles
outside a mask's tile range are skipped; tiles inside its full range are not masked at all.
Analytic biases are evaluated per tile; their gradients reach every tensor the bias depends on.

Grouped-query attention runs on the `(B, H_kv, G * Tq, D)` view: the G query heads of a key head
share each key tile's matmul.

Precision (`anyattn.precision`): the matmul operands are in `matmul_dtype` (bf16 for bf16 / fp16 inputs on
CPU: the GEMMs accumulate in fp32 and round their products to bf16 once); scores are widened to fp32 before
the bias, the mask and the softmax; the running max and sum, the output accumulator, the LSE and the
gradient accumulators are fp32. Outputs come back in the input dtype.
"""
from __future__ import annotations

import torch

from ..lse import NEG_INF, exp_shifted_, finish, online_softmax_step
from ..precision import matmul_dtype, stat_dtype
from ..validate import Shape
from .tiling import Plan as _Plan, make_plan, q_tile as _q_tile, rows as _rows, scores as _scores, segments as _segments

DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512


def _forward(plan: _Plan, q, k, v, bias_tensors):
    sh = plan.shape
    G = sh.groups
    qg = q.unflatten(1, (sh.H_kv, G))
    sd = plan.stat
    out = q.new_zeros(sh.B, sh.H_kv, G, sh.N_q, sh.D_v, dtype=sd)
    lse = q.new_full((sh.B, sh.H_kv, G, sh.N_q), NEG_INF, dtype=sd)
    masked = plan.mask is not None
    for (q0, span) in zip(range(0, sh.N_q, plan.block_q), plan.spans):
        q1 = min(q0 + plan.block_q, sh.N_q)
        tq = q1 - q0
        if span.hi <= span.lo:
            continue
        qt = _q_tile(qg, q0, q1, plan.scale, sd)
        m = q.new_full((sh.B, sh.H_kv, G * tq), NEG_INF, dtype=sd)
        l = q.new_zeros((sh.B, sh.H_kv, G * tq), dtype=sd)
        acc = q.new_zeros((sh.B, sh.H_kv, G * tq, sh.D_v), dtype=sd)
        for k0, k1, needs_mask in _segments(span, plan.block_k, masked):
            s, allowed = _scores(plan, qt, k, q0, q1, k0, k1, needs_mask, bias_tensors)
            m, l, acc = online_softmax_step(s, m, l, acc, v[:, :, k0:k1], plan.bias is not None, allowed)
        o, ls = finish(m, l, acc)
        out[:, :, :, q0:q1] = o.view(sh.B, sh.H_kv, G, tq, sh.D_v)
        lse[:, :, :, q0:q1] = ls.view(sh.B, sh.H_kv, G, tq)
    return out.flatten(1, 2), lse.flatten(1, 2)


def _backward(plan: _Plan, q, k, v, out, lse, dout, dlse, bias_tensors, bias_needs_grad):
    """out, lse, dout, dlse in the statistics dtype; q, k, v in the matmul dtype. Returns fp32 (fp64)
    gradients."""
    sh = plan.shape
    G = sh.groups
    sd, md = plan.stat, q.dtype
    qg = q.unflatten(1, (sh.H_kv, G))
    dog = dout.to(md).unflatten(1, (sh.H_kv, G))
    delta = (dout * out).sum(-1)
    if dlse is not None:
        delta = delta - dlse
    delta = delta.unflatten(1, (sh.H_kv, G))
    # Rows that saw no key have LSE -inf: use +inf so their probabilities recompute to 0, not NaN.
    lse_safe = torch.where(lse == NEG_INF, torch.full_like(lse, float("inf")), lse).unflatten(1, (sh.H_kv, G))
    dq = torch.zeros_like(qg, dtype=sd)
    dk = torch.zeros_like(k, dtype=sd)
    dv = torch.zeros_like(v, dtype=sd)
    dbias = [None] * len(bias_tensors)
    leaves = [t.detach().requires_grad_(g) for t, g in zip(bias_tensors, bias_needs_grad)]
    want = [i for i, g in enumerate(bias_needs_grad) if g]
    masked = plan.mask is not None
    for (q0, span) in zip(range(0, sh.N_q, plan.block_q), plan.spans):
        q1 = min(q0 + plan.block_q, sh.N_q)
        tq = q1 - q0
        if span.hi <= span.lo:
            continue
        qt = _q_tile(qg, q0, q1, plan.scale, sd)
        dot = dog[:, :, :, q0:q1].reshape(sh.B, sh.H_kv, G * tq, sh.D_v)
        lt = lse_safe[:, :, :, q0:q1].reshape(sh.B, sh.H_kv, G * tq, 1)
        dt = delta[:, :, :, q0:q1].reshape(sh.B, sh.H_kv, G * tq, 1)
        dqt = torch.zeros_like(qt, dtype=sd)
        for k0, k1, needs_mask in _segments(span, plan.block_k, masked):
            s, allowed = _scores(plan, qt, k, q0, q1, k0, k1, needs_mask, leaves)
            p = exp_shifted_(s, lt, plan.bias is not None, allowed)
            vt = v[:, :, k0:k1]
            pm = p.to(md)
            dv[:, :, k0:k1] += torch.matmul(pm.transpose(-1, -2), dot)
            dp = torch.matmul(dot, vt.transpose(-1, -2))
            # mixed-dtype elementwise ops take a slow path in torch: widen first, then work in place
            ds = (dp if dp.dtype == sd else dp.to(sd)).sub_(dt).mul_(p)
            dsm = ds.to(md)
            dqt += torch.matmul(dsm, k[:, :, k0:k1])
            dk[:, :, k0:k1] += torch.matmul(dsm.transpose(-1, -2), qt)
            if want:
                with torch.enable_grad():
                    bt = plan.bias.tile(leaves, q0, q1, k0, k1, sh.N_q, sh.N_k)
                    rows = _rows(bt, sh, tq)
                    # ds is summed over whatever the bias broadcasts over by autograd's expand rule.
                    grads = torch.autograd.grad(rows, [leaves[i] for i in want],
                                                ds.to(rows.dtype).sum_to_size(rows.shape), allow_unused=True)
                for i, g in zip(want, grads):
                    if g is not None:
                        dbias[i] = g if dbias[i] is None else dbias[i] + g
        dq[:, :, :, q0:q1] = (dqt * plan.scale).view(sh.B, sh.H_kv, G, tq, sh.D)
    for i in want:
        if dbias[i] is None:
            dbias[i] = torch.zeros_like(bias_tensors[i])
    return dq.flatten(1, 2), dk, dv, dbias


class _BlockedAttention(torch.autograd.Function):
    """q, k, v in the input dtype (cast to the matmul dtype inside, so gradients are rounded once, from
    fp32 to the input dtype); returns out and lse in the statistics dtype."""

    @staticmethod
    def forward(ctx, plan: _Plan, q, k, v, *bias_tensors):
        md = matmul_dtype(q.dtype, q.device)
        ctx.in_dtype = q.dtype
        q, k, v = q.to(md), k.to(md), v.to(md)
        out, lse = _forward(plan, q, k, v, bias_tensors)
        ctx.plan = plan
        ctx.save_for_backward(q, k, v, out, lse, *bias_tensors)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *bias_tensors = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        bias_needs_grad = list(ctx.needs_input_grad[4:])
        dq, dk, dv, dbias = _backward(ctx.plan, q, k, v, out, lse, dout, dlse, bias_tensors, bias_needs_grad)
        dq, dk, dv = (g.to(ctx.in_dtype) for g in (dq, dk, dv))
        dbias = [d.to(t.dtype) if d is not None else None for d, t in zip(dbias, bias_tensors)]
        return (None, dq, dk, dv, *dbias)


def blocked_block_backward(q, k, v, out, lse, dout, dlse, mask, bias, scale: float, shape: Shape,
                           block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """Gradients of one key block given the rows' *final* `out` and `lse` over all key blocks, for callers
    that merge blocks by LSE (`anyattn.distributed`): the backward recomputes `p = exp(s - lse)`, the
    global probabilities, and `delta = rowsum(dout * out) - dlse`. Inputs in float32/float64 (the
    work dtype); dlse may be None. Returns `(dq, dk, dv, dbias)` with dbias one gradient (or None when
    not required) per `bias.tensors()`."""
    plan = make_plan(shape, scale, mask, bias, block_q, block_k, stat_dtype(q.dtype))
    bias_tensors = tuple(bias.tensors()) if bias is not None else ()
    needs = [t.requires_grad for t in bias_tensors]
    dq, dk, dv, dbias = _backward(plan, q, k, v, out, lse, dout, dlse, [t.detach() for t in bias_tensors], needs)
    return dq, dk, dv, dbias


def blocked_attention(q, k, v, mask, bias, scale: float, shape: Shape,
                      block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K):
    """Exact attention by tiles. q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`;
    mask: a `masks.Mask` or None; bias: a `biases.Bias` or None. Returns out `(B, H, N_q, D_v)` in q's
    dtype and lse `(B, H, N_q)` in float32 (float64 for float64 inputs)."""
    dtype = q.dtype
    plan = make_plan(shape, scale, mask, bias, block_q, block_k, stat_dtype(dtype))
    bias_tensors = tuple(bias.tensors()) if bias is not None else ()
    out, lse = _BlockedAttention.apply(plan, q, k, v, *bias_tensors)
    return out.to(dtype), lse
