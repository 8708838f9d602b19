"""Exact attention of query tiles over their key halos: the engine behind neighborhood attention.

Problem: query tiles of `Tq` rows; tile `i` attends to the `Hk` keys of its halo, a window of a flat key
buffer, under a per-tile mask; every row's keys lie inside its tile's halo, so a tile's softmax is
complete in one pass: `s = (q * scale) k_halo^T + mask` (mask: 0 / -inf), `p = softmax(s)`,
`out = p v_halo`. There is no running max across key blocks (unlike `blocked`) and nothing of size
`N x N`. The work comes as `Group`s: runs of consecutive query tiles whose halos start at a fixed
stride in the key buffer (overlapping windows of one buffer are views, not copies), with one mask
`(1, Tq, Hk)` broadcast over the run or one mask per tile. A group is sized to about
`GROUP_ELEMENTS` score entries, so its scores stay in cache through the matmul (which adds the mask:
`baddbmm`), the fused softmax and the second matmul.

Backward (hand-written, `_HaloAttention`): per group, recompute `s` and `p`, then `dp = do v^T`,
`ds = softmax_backward(dp, p) + p * dlse`, `dq = ds k * scale`, `dk_halo = ds^T q * scale`,
`dv_halo = p^T do`; halo gradients are added back into the key buffer with `ceil(Hk / stride)` strided
adds (each a set of non-overlapping windows). Only the inputs are saved for backward.

Precision (`anyattn.precision`): operands in the matmul dtype (bf16 for bf16 / fp16 inputs on CPU; the
GEMMs accumulate in fp32 and round their products once); the softmax computes its max and sum in fp32
(torch widens bf16 inside the kernel) and rounds `p` once; the LSE (only when asked) and the gradient
accumulators are fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lse import NEG_INF

#: score entries per group (1 MiB in bf16, 2 MiB in fp32): a group's scores stay in cache.
GROUP_ELEMENTS = 1 << 19


@dataclass(frozen=True, eq=False)
class Group:
    """`n` query tiles `q0 + i * q_stride`; the halo of the i-th is `Hk` keys of width D (D_v) starting at
    element `k_off + i * k_step` of the key buffer (`v_off + i * v_step` of the value buffer); mask: None,
    `(1, Tq, Hk)` or `(n, Tq, Hk)`, additive, in the matmul dtype."""

    q0: int
    n: int
    q_stride: int
    k_off: int
    k_step: int
    v_off: int
    v_step: int
    mask: torch.Tensor | None


def group_size(tq: int, hk: int) -> int:
    """Tiles per group for `(Tq, Hk)` scores: about `GROUP_ELEMENTS` entries."""
    return max(1, GROUP_ELEMENTS // (tq * hk))


def _view(buf, off, step, n, hk, width):
    return buf.as_strided((n, hk, width), (step, width, 1), buf.storage_offset() + off)


def _rows(t, g):
    """The group's tiles of a `(n_tiles, Tq, X)` contiguous tensor (a view)."""
    n_all, tq, x = t.shape
    return t.as_strided((g.n, tq, x), (g.q_stride * tq * x, x, 1), t.storage_offset() + g.q0 * tq * x)


def _put(dst, g, value):
    """Write `value` `(n, ...)` into the group's tiles of `dst`."""
    if g.q_stride == 1:
        dst[g.q0:g.q0 + g.n] = value
    else:
        dst[g.q0:g.q0 + (g.n - 1) * g.q_stride + 1:g.q_stride] = value


def _scores(q, kh, mask, scale):
    """`scale * q kh^T + mask` (the matmul call scales and adds the mask)."""
    if mask is None:
        return torch.bmm(q * scale, kh.transpose(1, 2))
    return torch.baddbmm(mask.expand(q.shape[0], -1, -1), q, kh.transpose(1, 2), alpha=scale)


def _forward(groups, hk, scale, qt, kbuf, vbuf, d_v, need_lse):
    stat = torch.promote_types(qt.dtype, torch.float32)
    n, tq, d = qt.shape
    out = qt.new_empty(n, tq, d_v)  # every tile belongs to one group
    lse = qt.new_empty(n, tq, dtype=stat) if need_lse else None
    for g in groups:
        s = _scores(_rows(qt, g), _view(kbuf, g.k_off, g.k_step, g.n, hk, d), g.mask, scale)
        if need_lse:
            _put(lse, g, torch.logsumexp(s.to(stat), -1))
        p = torch.softmax(s, -1)
        vh = _view(vbuf, g.v_off, g.v_step, g.n, hk, d_v)
        if g.q_stride == 1:
            torch.bmm(p, vh, out=out[g.q0:g.q0 + g.n])
        else:
            _put(out, g, torch.bmm(p, vh))
    return out, lse


def _add_halos_(buf, grad, off, step, alpha=1.0):
    """Add `alpha *` halo gradients `grad` `(m, Hk, width)` into the flat buffer at `off + i * step`, in
    `ceil(Hk * width / step)` strided adds of non-overlapping windows."""
    m, hk, width = grad.shape
    rows = max(1, step // width)
    grad = grad.to(buf.dtype)  # widen once: mixed-dtype in-place adds take a slow path in torch
    for r0 in range(0, hk, rows):
        w = min(rows, hk - r0)
        buf.as_strided((m, w, width), (step, width, 1), off + r0 * width).add_(grad[:, r0:r0 + w], alpha=alpha)


def _backward(groups, hk, scale, qt, kbuf, vbuf, d_v, dout, dlse):
    stat = torch.promote_types(qt.dtype, torch.float32)
    n, tq, d = qt.shape
    dq = torch.empty(qt.shape, dtype=stat, device=qt.device)
    dk = torch.zeros(kbuf.shape, dtype=stat, device=kbuf.device)
    dv = torch.zeros(vbuf.shape, dtype=stat, device=vbuf.device)
    dout = dout.to(qt.dtype).contiguous()
    dlse = dlse.contiguous() if dlse is not None else None
    for g in groups:
        qg = _rows(qt, g)
        kh = _view(kbuf, g.k_off, g.k_step, g.n, hk, d)
        vh = _view(vbuf, g.v_off, g.v_step, g.n, hk, d_v)
        p = torch.softmax(_scores(qg, kh, g.mask, scale), -1)
        do = _rows(dout, g)
        ds = torch._softmax_backward_data(torch.bmm(do, vh.transpose(1, 2)), p, -1, p.dtype)
        if dlse is not None:
            dl = _rows(dlse.unsqueeze(-1), g)
            ds = ds.to(stat).addcmul_(p.to(stat), dl).to(p.dtype)
        _put(dq, g, torch.bmm(ds, kh).mul_(scale))
        _add_halos_(dk, torch.bmm(ds.transpose(1, 2), qg), g.k_off, g.k_step, scale)
        _add_halos_(dv, torch.bmm(p.transpose(1, 2), do), g.v_off, g.v_step)
    return dq, dk, dv


class _HaloAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, groups, hk, d_v, scale, need_lse, qt, kbuf, vbuf):
        out, lse = _forward(groups, hk, scale, qt, kbuf, vbuf, d_v, need_lse)
        ctx.args = (groups, hk, scale, d_v)
        ctx.save_for_backward(qt, kbuf, vbuf)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        qt, kbuf, vbuf = ctx.saved_tensors
        groups, hk, scale, d_v = ctx.args
        if dout is None:
            dout = torch.zeros(qt.shape[:-1] + (d_v,), dtype=qt.dtype, device=qt.device)
        dq, dk, dv = _backward(groups, hk, scale, qt, kbuf, vbuf, d_v, dout, dlse)
        return None, None, None, None, None, dq.to(qt.dtype), dk.to(kbuf.dtype), dv.to(vbuf.dtype)


def halo_attention(groups: list, hk: int, scale: float, qt, kbuf, vbuf, d_v: int, need_lse: bool):
    """qt `(n, Tq, D)`; kbuf, vbuf: 1-D contiguous key / value buffers; all in the matmul dtype; groups:
    the `Group`s to compute (each tile in exactly one). Returns out `(n, Tq, D_v)` in the matmul dtype
    and lse `(n, Tq)` in fp32 (fp64 for fp64 inputs), or None unless `need_lse`. Every row must have an
    allowed key (true in neighborhood attention: every query sees itself)."""
    return _HaloAttention.apply(groups, hk, d_v, scale, need_lse, qt, kbuf, vbuf)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask (True = attend) -> 0 / -inf in `dtype`."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, NEG_INF)
