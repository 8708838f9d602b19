"""Windowed 2-simplicial attention (Clift et al., "Logic and the 2-Simplicial Transformer", ICLR 2020;
Roy et al., "Fast and Simplex: 2-Simplicial Attention in Triton", 2025), METHODS.md "Structured,
hierarchical and 2-D mixers":

    s_ijk = scale * sum_d q_id k1_jd k2_kd,    o_i = sum_{j,k} softmax_{(j,k)}(s_i..)_jk (v1_j * v2_k)

with j in a window of w1 keys and k in a window of w2 keys around i (causal: `i - w + 1 .. i`;
non-causal: `i - w // 2 .. i - w // 2 + w - 1`; keys outside `[0, N)` are dropped, windows do not shift).

Per query the work is O(w1 w2 D): `A = q_i * K1_win` (w1 x D), `S = A K2_win^T` (w1 x w2), one softmax over
all w1 w2 entries, `o_i = sum_j v1_j * (P V2_win)_j`. Windows are strided views (`unfold`) of the padded
keys; queries run in chunks through batched matmuls. The backward pass is written by hand: it recomputes
each chunk's probabilities from the saved log-sum-exp (FlashAttention-style) and folds window gradients
back with `F.fold` (overlap-add), so training memory is O(N D) plus one chunk, not O(N w1 w2).

`simplicial_attention_ref` is the oracle: the dense trilinear form over all (j, k) with the window mask,
one query at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import check_qkv, check_same_device_dtype, check_scale, check_tensor

__all__ = ["simplicial_attention", "simplicial_attention_ref"]

#: elements of one chunk's (queries x w1 x max(w2, D)) temporaries
CHUNK_ELEMS = 1 << 21


def _spans(w: int, is_causal: bool) -> tuple[int, int]:
    """(left, right) extent of a window of w keys."""
    if is_causal:
        return w - 1, 0
    left = w // 2
    return left, w - 1 - left


def _check(q, k1, k2, v1, v2, window, is_causal, scale):
    shape = check_qkv(q, k1, v1)
    for name, x in (("k2", k2), ("v2", v2)):
        check_tensor(name, x)
    if k2.shape != k1.shape or v2.shape != v1.shape:
        raise ValueError(f"k2, v2 must have the shapes of k1, v1 {tuple(k1.shape)}, {tuple(v1.shape)}, got "
                         f"{tuple(k2.shape)}, {tuple(v2.shape)}")
    check_same_device_dtype("q", q, k2=k2, v2=v2)
    if shape.N_q != shape.N_k:
        raise ValueError(f"simplicial attention is self-attention: q and k1 must have the same length, got "
                         f"N_q = {shape.N_q}, N_k = {shape.N_k}")
    if not isinstance(window, (tuple, list)) or len(window) != 2 or \
            any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in window):
        raise ValueError(f"window must be a pair of positive ints (w1, w2), got {window!r}")
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    return shape, check_scale(scale, shape.D)


def _windows(x, w, left, right):
    """(B, H, N, C) -> padded copy (B, H, N + w - 1, C) and its window view (B, H, N, w, C)."""
    xp = F.pad(x, (0, 0, left, right))
    return xp, xp.unfold(2, w, 1).transpose(-1, -2)


def _valid(i0, i1, w, left, N, device):
    """Bool (c, w): window slot a of query i holds key i - left + a inside [0, N)."""
    pos = torch.arange(i0, i1, device=device)[:, None] - left + torch.arange(w, device=device)[None, :]
    return (pos >= 0) & (pos < N)


class _Plan:
    def __init__(self, N, w1, w2, is_causal, scale, chunk):
        self.N, self.w1, self.w2, self.scale, self.chunk = N, w1, w2, scale, chunk
        self.l1, self.r1 = _spans(w1, is_causal)
        self.l2, self.r2 = _spans(w2, is_causal)

    def chunks(self):
        return [(i0, min(self.N, i0 + self.chunk)) for i0 in range(0, self.N, self.chunk)]

    def needs_mask(self, i0, i1):
        return i0 < max(self.l1, self.l2) or i1 > self.N - max(self.r1, self.r2)

    def mask(self, i0, i1, device):
        m1 = _valid(i0, i1, self.w1, self.l1, self.N, device)
        m2 = _valid(i0, i1, self.w2, self.l2, self.N, device)
        return m1[:, :, None] & m2[:, None, :]                          # (c, w1, w2)


def _probs(plan, qc, K1c, K2c, i0, i1):
    """A = q * K1 windows, probabilities P (masked entries 0) and lse for one chunk."""
    A = qc.unsqueeze(-2) * K1c                                          # (B, H, c, w1, D)
    S = torch.matmul(A, K2c.transpose(-1, -2)).mul_(plan.scale)         # (B, H, c, w1, w2)
    if plan.needs_mask(i0, i1):
        S.masked_fill_(~plan.mask(i0, i1, S.device), float("-inf"))
    lse = torch.logsumexp(S.flatten(-2), -1)                            # every query sees itself: finite
    P = S.sub_(lse[..., None, None]).exp_()
    return A, P, lse


def _forward(plan, q, k1, k2, v1, v2):
    B, H, N, D = q.shape
    _, K1w = _windows(k1, plan.w1, plan.l1, plan.r1)
    _, K2w = _windows(k2, plan.w2, plan.l2, plan.r2)
    _, V1w = _windows(v1, plan.w1, plan.l1, plan.r1)
    _, V2w = _windows(v2, plan.w2, plan.l2, plan.r2)
    out = q.new_empty(B, H, N, v1.shape[-1])
    lse = q.new_empty(B, H, N)
    for i0, i1 in plan.chunks():
        _, P, l = _probs(plan, q[:, :, i0:i1], K1w[:, :, i0:i1], K2w[:, :, i0:i1], i0, i1)
        PV2 = torch.matmul(P, V2w[:, :, i0:i1])                          # (B, H, c, w1, Dv)
        out[:, :, i0:i1] = (PV2 * V1w[:, :, i0:i1]).sum(-2)
        lse[:, :, i0:i1] = l
    return out, lse


def _overlap_add(dst, win_grad, i0, w):
    """dst (B, H, Np, C) padded buffer += window gradients (B, H, c, w, C) of queries [i0, i0 + c):
    slot a of query i lands on padded position i + a (w strided adds)."""
    c = win_grad.shape[2]
    for a in range(w):
        dst[:, :, i0 + a:i0 + a + c] += win_grad[:, :, :, a]


def _backward(plan, q, k1, k2, v1, v2, out, lse, dout):
    B, H, N, D = q.shape
    k1p, K1w = _windows(k1, plan.w1, plan.l1, plan.r1)
    k2p, K2w = _windows(k2, plan.w2, plan.l2, plan.r2)
    v1p, V1w = _windows(v1, plan.w1, plan.l1, plan.r1)
    v2p, V2w = _windows(v2, plan.w2, plan.l2, plan.r2)
    dq = torch.empty_like(q)
    dk1, dv1 = torch.zeros_like(k1p), torch.zeros_like(v1p)
    dk2, dv2 = torch.zeros_like(k2p), torch.zeros_like(v2p)
    delta = (dout * out).sum(-1)
    for i0, i1 in plan.chunks():
        qc = q[:, :, i0:i1]
        # One contiguous copy of each chunk's windows (the matmuls below would otherwise copy them again).
        K1c, K2c, V1c, V2c = (x[:, :, i0:i1].contiguous() for x in (K1w, K2w, V1w, V2w))
        S = torch.matmul(qc.unsqueeze(-2) * K1c, K2c.transpose(-1, -2)).mul_(plan.scale)
        if plan.needs_mask(i0, i1):
            S.masked_fill_(~plan.mask(i0, i1, S.device), float("-inf"))
        P = S.sub_(lse[:, :, i0:i1, None, None]).exp_()                 # (B, H, c, w1, w2)
        do = dout[:, :, i0:i1].unsqueeze(-2)                            # (B, H, c, 1, Dv)
        Gm = do * V1c                                                   # d(P V2) (B, H, c, w1, Dv)
        dV1c = do * torch.matmul(P, V2c)
        dV2c = torch.matmul(P.transpose(-1, -2), Gm)                    # (B, H, c, w2, Dv)
        dS = torch.matmul(Gm, V2c.transpose(-1, -2))                    # dP
        dS.sub_(delta[:, :, i0:i1, None, None]).mul_(P).mul_(plan.scale)
        A = qc.unsqueeze(-2) * K1c
        dA = torch.matmul(dS, K2c)                                      # (B, H, c, w1, D)
        dK2c = torch.matmul(dS.transpose(-1, -2), A)                    # (B, H, c, w2, D)
        dq[:, :, i0:i1] = (dA * K1c).sum(-2)
        dK1c = dA.mul_(qc.unsqueeze(-2))
        _overlap_add(dk1, dK1c, i0, plan.w1)
        _overlap_add(dv1, dV1c, i0, plan.w1)
        _overlap_add(dk2, dK2c, i0, plan.w2)
        _overlap_add(dv2, dV2c, i0, plan.w2)
    crop = lambda t, l: t[:, :, l:l + N]  # noqa: E731
    return dq, crop(dk1, plan.l1), crop(dk2, plan.l2), crop(dv1, plan.l1), crop(dv2, plan.l2)


class _Simplicial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan, q, k1, k2, v1, v2):
        out, lse = _forward(plan, q, k1, k2, v1, v2)
        ctx.plan = plan
        ctx.save_for_backward(q, k1, k2, v1, v2, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k1, k2, v1, v2, out, lse = ctx.saved_tensors
        return (None,) + _backward(ctx.plan, q, k1, k2, v1, v2, out, lse, dout.contiguous())


def simplicial_attention(q, k1, k2, v1, v2, *, window=(32, 32), is_causal: bool = True, scale=None,
                         chunk_size: int | None = None):
    """Windowed 2-simplicial (trilinear) attention in O(N w1 w2 D), forward and backward.

    q `(B, H, N, D)`; k1, k2 `(B, H_kv, N, D)`; v1, v2 `(B, H_kv, N, D_v)`, `H % H_kv == 0`.
    window `(w1, w2)`: keys j of the first pair and k of the second pair lie within w1, w2 positions of the
    query (causal: the w keys ending at i; non-causal: centred, `w // 2` to the left); scale multiplies
    the trilinear logits (default `D ** -0.5`); chunk_size: queries per chunk (default: bounded temporaries).
    Returns out `(B, H, N, D_v)` with `o_i = sum_{j,k} P_ijk (v1_j * v2_k)`, P a softmax over all (j, k).
    """
    shape, scale = _check(q, k1, k2, v1, v2, window, is_causal, scale)
    w1, w2 = window
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    B, H, N, D = q.shape
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMS // (B * H * w1 * max(w2, D, shape.D_v)))
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    G = shape.groups
    rep = (lambda x: x.to(work)) if G == 1 else (lambda x: x.to(work).repeat_interleave(G, 1))
    plan = _Plan(N, w1, w2, is_causal, scale, chunk_size)
    out = _Simplicial.apply(plan, q.to(work).contiguous(), *(rep(x).contiguous() for x in (k1, k2, v1, v2)))
    return out.to(dtype)


def simplicial_attention_ref(q, k1, k2, v1, v2, *, window=(32, 32), is_causal: bool = True, scale=None):
    """The oracle: per query the dense trilinear logits over ALL (j, k) pairs, masked to the windows,
    one softmax, `sum_jk P_jk v1_j * v2_k`. O(N^3 D) time: for tests and the benchmark's exact column."""
    shape, scale = _check(q, k1, k2, v1, v2, window, is_causal, scale)
    G = shape.groups
    k1, k2, v1, v2 = (x.repeat_interleave(G, 1) for x in (k1, k2, v1, v2))
    N = shape.N_q
    l1, r1 = _spans(window[0], is_causal)
    l2, r2 = _spans(window[1], is_causal)
    j = torch.arange(N, device=q.device)
    outs = []
    for i in range(N):
        s = torch.einsum("bhd,bhjd,bhkd->bhjk", q[:, :, i], k1, k2) * scale
        ok = ((j >= i - l1) & (j <= i + r1))[:, None] & ((j >= i - l2) & (j <= i + r2))[None, :]
        p = torch.softmax(s.masked_fill(~ok, float("-inf")).flatten(-2), -1).view_as(s)
        outs.append(torch.einsum("bhjk,bhje,bhke->bhe", p, v1, v2))
    return torch.stack(outs, 2)
