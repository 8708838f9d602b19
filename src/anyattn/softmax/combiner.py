"""Combiner-Fixed attention (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation
Cost", NeurIPS 2021; google-research `combiner/.../layer.py`, `_SelfAttSqrtn`), METHODS.md
"Structured, hierarchical and 2-D mixers".

The sequence is cut into segments of `s` tokens (default about sqrt(N)). Segment rho gets a summary:

    k_bar_rho = pool_{j in rho} k_j,   q_bar_rho = pool_{j in rho} q_j        (pool: max or mean)
    v_til_rho = sum_{j in rho} softmax_j(q_bar_rho . k_j * scale) v_j

Query i of segment r takes ONE joint softmax over its local keys (`j in r`, `j <= i` when causal) and
the summaries of the other segments (`rho < r` causal, `rho != r` non-causal):

    o_i = sum_j P_ij v_j + sum_rho P_i,rho v_til_rho.

Computed exactly as two attentions merged by their log-sum-exp (`anyattn.lse.merge`): the local part
is one batched SDPA call over segments (causal inside), the summary part one SDPA call of the N
queries over the R summaries with a segment mask (N x R, no N x N tensor anywhere). Both go through
`anyattn.softmax.lse_attention.attention_lse` (SDPA's CPU flash kernel with a differentiable LSE; the
blocked engine where SDPA has no LSE), so forward and backward are O(N (s + R) D) time and O(N D + N R)
memory.

`combiner_step` is the decode form: finished segments are frozen as summaries in a `CombinerState`;
new tokens attend to their own segment's keys plus the frozen summaries. `combiner_matrix` builds the
equivalent dense row-stochastic matrix (the oracle, O(N^2)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..lse import merge
from ..masks import Causal, Dense
from ..validate import Shape, check_qkv, check_scale
from .lse_attention import attention_lse
from .sdpa import sdpa_attention

POOLINGS = ("max", "mean")

__all__ = ["combiner", "combiner_step", "combiner_matrix", "CombinerState", "default_segment_size"]


def default_segment_size(n: int) -> int:
    """About sqrt(N) (at least 1): local and summary parts then cost the same."""
    return max(1, round(math.sqrt(n)))


def _check(q, k, v, segment_size, pooling, scale):
    shape = check_qkv(q, k, v)
    if shape.N_q != shape.N_k:
        raise ValueError(f"combiner is self-attention: q and k must have the same length, got N_q = {shape.N_q}, "
                         f"N_k = {shape.N_k}")
    if segment_size is not None and (isinstance(segment_size, bool) or not isinstance(segment_size, int)
                                     or segment_size < 1):
        raise ValueError(f"segment_size must be a positive int or None, got {segment_size!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return shape, check_scale(scale, shape.D)


def _heads(x, G):
    return x if G == 1 else x.repeat_interleave(G, dim=1)


def _pool(x, pooling):
    """Pool `(..., s, D)` over the segment axis."""
    return x.amax(-2) if pooling == "max" else x.mean(-2)


def _summaries(q, k, v, s, pooling, scale):
    """Summaries of consecutive segments of q, k, v `(B, H, n, .)` (the last may be partial):
    k_bar `(B, H, R, D)`, v_til `(B, H, R, D_v)`."""
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    R_full = n // s
    kb, vt = [], []
    if R_full:
        m = R_full * s
        qs, ks, vs = (x[:, :, :m].reshape(B * H, R_full, s, x.shape[-1]) for x in (q, k, v))
        qb = _pool(qs, pooling).unsqueeze(2)                                     # (BH, R, 1, D)
        kb.append(_pool(ks, pooling).reshape(B, H, R_full, D))
        o, _ = sdpa_attention(qb, ks, vs, None, False, scale, Shape(B * H, R_full, R_full, 1, s, D, Dv), False)
        vt.append(o.reshape(B, H, R_full, Dv))
    if n > R_full * s:                                                           # partial tail segment
        qs, ks, vs = (x[:, :, R_full * s:] for x in (q, k, v))
        qb = _pool(qs, pooling).unsqueeze(2)
        kb.append(_pool(ks, pooling).unsqueeze(2))
        o, _ = sdpa_attention(qb, ks, vs, None, False, scale, Shape(B, H, H, 1, ks.shape[2], D, Dv), False)
        vt.append(o)
    return torch.cat(kb, 2), torch.cat(vt, 2)


def _local(q, k, v, s, is_causal, scale):
    """Attention inside segments (causal inside when asked), with LSE. Returns `(out, lse)`."""
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    R_full = N // s
    outs, lses = [], []
    causal = Causal("top_left") if is_causal else None
    if R_full:
        m = R_full * s
        qs, ks, vs = (x[:, :, :m].reshape(B * H, R_full, s, x.shape[-1]) for x in (q, k, v))
        o, l = attention_lse(qs, ks, vs, causal, scale, Shape(B * H, R_full, R_full, s, s, D, Dv))
        outs.append(o.reshape(B, H, m, Dv))
        lses.append(l.reshape(B, H, m))
    if N > R_full * s:
        qs, ks, vs = (x[:, :, R_full * s:] for x in (q, k, v))
        t = qs.shape[2]
        o, l = attention_lse(qs, ks, vs, causal, scale, Shape(B, H, H, t, t, D, Dv))
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def combiner(q, k, v, *, segment_size=None, is_causal: bool = True, pooling: str = "max", scale=None,
             return_lse: bool = False):
    """Combiner-Fixed attention (local segment plus region summaries in one joint softmax).

    q `(B, H, N, D)`, k `(B, H_kv, N, D)`, v `(B, H_kv, N, D_v)`, `H % H_kv == 0`. segment_size: tokens per
    segment (default `round(sqrt(N))`; the last segment may be shorter); is_causal: local keys `j <= i`
    and summaries of earlier segments only (else the whole own segment and every other segment's
    summary); pooling: "max" (as in the paper) or "mean" for `k_bar`, `q_bar`; scale: default `D ** -0.5`.
    Returns out `(B, H, N, D_v)`, or `(out, lse)` with lse `(B, H, N)` of the joint softmax.
    Reference: Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost" (2021).
    """
    shape, scale = _check(q, k, v, segment_size, pooling, scale)
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    B, H, N, D = q.shape
    Dv = v.shape[-1]
    s = default_segment_size(N) if segment_size is None else min(segment_size, N)
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(work), _heads(k.to(work), shape.groups), _heads(v.to(work), shape.groups)
    out, lse = _local(q, k, v, s, is_causal, scale)
    R = -(-N // s)
    if R > 1:
        kb, vt = _summaries(q, k, v, s, pooling, scale)
        seg = torch.arange(N, device=q.device) // s
        rho = torch.arange(R, device=q.device)
        allowed = (rho[None, :] < seg[:, None]) if is_causal else (rho[None, :] != seg[:, None])
        first = s if is_causal else 0  # causal: the first segment has no summary to attend
        qq = q[:, :, first:]
        o2, l2 = attention_lse(qq, kb, vt, Dense(allowed[first:].view(1, 1, N - first, R)), scale,
                                Shape(B, H, H, N - first, R, D, Dv))
        o_m, l_m = merge([out[:, :, first:], o2.to(out.dtype)], [lse[:, :, first:], l2.to(lse.dtype)])
        if first:
            out = torch.cat([out[:, :, :first], o_m], 2)
            lse = torch.cat([lse[:, :, :first], l_m], 2)
        else:
            out, lse = o_m, l_m
    out = out.to(dtype)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------- decode
@dataclass
class CombinerState:
    """Decode state of `combiner_step` (causal). k_sum `(B, H, R, D)` / v_sum `(B, H, R, D_v)`: the frozen
    summaries of the R finished segments; k_cur / v_cur `(B, H, t, .)`: keys and values of the current,
    unfinished segment (t < segment_size tokens); q_pool `(B, H, D)`: pool of its queries so far (running
    max, or running sum for mean pooling); length: tokens seen. Heads are the query heads (grouped k/v are
    repeated). `reorder(index)` reorders the batch (beam search)."""

    segment_size: int
    pooling: str
    scale: float
    k_sum: torch.Tensor
    v_sum: torch.Tensor
    k_cur: torch.Tensor
    v_cur: torch.Tensor
    q_pool: torch.Tensor | None
    length: int

    def reorder(self, index: torch.Tensor) -> None:
        for name in ("k_sum", "v_sum", "k_cur", "v_cur", "q_pool"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, index.to(t.device)))


def _pool_queries(q, prior, a, b, pooling):
    """Running pool of the new queries `q[:, :, a:b]` joined with a prior pool (max, or sum for mean)."""
    part = q[:, :, a:b]
    p = part.amax(2) if pooling == "max" else part.sum(2)
    if prior is not None:
        p = torch.maximum(p, prior) if pooling == "max" else p + prior
    return p


def _first_step(q, k, v, shape, s, pooling, scale):
    """No past: the parallel `combiner` for the outputs; the state is the summaries of the finished
    segments and the unfinished tail."""
    out = combiner(q, k, v, segment_size=s, is_causal=True, pooling=pooling, scale=scale)
    work = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(work), _heads(k.to(work), shape.groups), _heads(v.to(work), shape.groups)
    B, H, N, D = q.shape
    full = (N // s) * s
    if full:
        k_sum, v_sum = _summaries(q[:, :, :full], k[:, :, :full], v[:, :, :full], s, pooling, scale)
    else:
        k_sum, v_sum = q.new_zeros(B, H, 0, D), q.new_zeros(B, H, 0, shape.D_v)
    pool = _pool_queries(q, None, full, N, pooling) if N > full else None
    return out, CombinerState(s, pooling, scale, k_sum, v_sum, k[:, :, full:], v[:, :, full:], pool, N)


def combiner_step(q, k, v, state: CombinerState | None = None, *, segment_size: int | None = None,
                  pooling: str = "max", scale=None):
    """Causal Combiner for new tokens given the past: q `(B, H, T, D)`, k `(B, H_kv, T, D)`,
    v `(B, H_kv, T, D_v)` (T >= 1, positions `state.length ...`). Finished segments are frozen as summaries
    (decode never revisits them). Returns `(out (B, H, T, D_v), new_state)`. The first call (state None)
    needs segment_size; later calls take it (and pooling, scale) from the state. Feeding a sequence in
    chunks of any sizes gives `combiner(..., segment_size=s, is_causal=True)` on the whole sequence.
    """
    if state is not None and not isinstance(state, CombinerState):
        raise TypeError(f"state must be a CombinerState or None, got {type(state).__name__}")
    if state is None:
        if segment_size is None:
            raise ValueError("combiner_step needs segment_size on the first call (state=None)")
        shape, scale = _check(q, k, v, segment_size, pooling, scale)
    else:
        shape, _ = _check(q, k, v, state.segment_size, state.pooling, None)
        segment_size, pooling, scale = state.segment_size, state.pooling, state.scale
        if state.k_cur.shape[0] != shape.B or state.k_cur.shape[1] != shape.H:
            raise ValueError(f"state holds (B, H) = {tuple(state.k_cur.shape[:2])}, got q with {(shape.B, shape.H)}")
    if state is None:
        return _first_step(q, k, v, shape, segment_size, pooling, scale)
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    s, B, H, T = segment_size, shape.B, shape.H, shape.N_q
    q, k, v = q.to(work), _heads(k.to(work), shape.groups), _heads(v.to(work), shape.groups)
    t0 = state.k_cur.shape[2]                     # tokens already in the current segment
    K = torch.cat([state.k_cur.to(work), k], 2)   # keys from the current segment's start, (B, H, t0 + T, D)
    V = torch.cat([state.v_cur.to(work), v], 2)
    n = t0 + T
    pos = torch.arange(t0, n, device=q.device)    # query positions relative to the segment start
    seg_q = pos // s
    n_done = n // s                               # segments of K finished after this call
    new_k, new_v = [], []
    for r in range(n_done):                       # at most ceil(T / s) + 1 segments: not a token loop
        a, b = r * s, (r + 1) * s
        qb = _pool_queries(q, state.q_pool if r == 0 else None, max(a, t0) - t0, b - t0, pooling)
        if pooling == "mean":
            qb = qb / s
        kb = _pool(K[:, :, a:b], pooling)
        o, _ = sdpa_attention(qb.unsqueeze(2), K[:, :, a:b], V[:, :, a:b], None, False, scale,
                              Shape(B, H, H, 1, s, shape.D, shape.D_v), False)
        new_k.append(kb.unsqueeze(2))
        new_v.append(o)
    k_sum = torch.cat([state.k_sum.to(work)] + new_k, 2)
    v_sum = torch.cat([state.v_sum.to(work)] + new_v, 2)
    R0 = state.k_sum.shape[2]
    # One joint softmax per query over [frozen summaries; new summaries; own segment's keys <= query].
    keys = torch.cat([k_sum, K], 2)
    vals = torch.cat([v_sum, V], 2)
    rho = torch.arange(R0 + n_done, device=q.device)
    summ_ok = (rho[None, :] < R0) | ((rho[None, :] - R0) < seg_q[:, None])
    j = torch.arange(n, device=q.device)
    loc_ok = ((j[None, :] // s) == seg_q[:, None]) & (j[None, :] <= pos[:, None])
    allowed = torch.cat([summ_ok, loc_ok], 1).view(1, 1, T, -1)
    out, _ = sdpa_attention(q, keys, vals, allowed, False, scale,
                            Shape(B, H, H, T, keys.shape[2], shape.D, shape.D_v), False)
    rest = n_done * s
    pool = None
    if n > rest:
        pool = _pool_queries(q, state.q_pool if rest == 0 else None, max(rest, t0) - t0, T, pooling)
    new_state = CombinerState(s, pooling, scale, k_sum, v_sum, K[:, :, rest:], V[:, :, rest:], pool,
                              state.length + T)
    return out.to(dtype), new_state


# ------------------------------------------------------------------------------------------- oracle
def combiner_matrix(q, k, *, segment_size=None, is_causal: bool = True, pooling: str = "max", scale=None):
    """The dense row-stochastic matrix P `(B, H, N, N)` with `combiner(q, k, v) == P @ v` (the oracle;
    O(N^2) memory, written segment by segment from the definition). Every row sums to 1."""
    v = k.new_zeros(k.shape[:-1] + (1,))
    shape, scale = _check(q, k, v, segment_size, pooling, scale)
    B, H, N, D = q.shape
    s = default_segment_size(N) if segment_size is None else min(segment_size, N)
    k = _heads(k, shape.groups)
    R = -(-N // s)
    seg = torch.arange(N, device=q.device) // s
    # Summary weights a[rho, j]: softmax over the keys of segment rho under q_bar_rho.
    A = q.new_zeros(B, H, R, N)
    kbar = q.new_zeros(B, H, R, D)
    for r in range(R):
        a, b = r * s, min(N, (r + 1) * s)
        qb = _pool(q[:, :, a:b], pooling)
        kbar[:, :, r] = _pool(k[:, :, a:b], pooling)
        A[:, :, r, a:b] = torch.softmax((k[:, :, a:b] @ qb.unsqueeze(-1)).squeeze(-1) * scale, -1)
    i = torch.arange(N, device=q.device)
    local_ok = (seg[None, :] == seg[:, None]) & ((i[None, :] <= i[:, None]) if is_causal else True)
    rho = torch.arange(R, device=q.device)
    summ_ok = (rho[None, :] < seg[:, None]) if is_causal else (rho[None, :] != seg[:, None])
    logits = torch.cat([(q @ k.transpose(-1, -2)) * scale, (q @ kbar.transpose(-1, -2)) * scale], -1)
    logits = logits.masked_fill(~torch.cat([local_ok, summ_ok], 1), float("-inf"))
    Z = torch.softmax(logits, -1)
    return Z[..., :N] + Z[..., N:] @ A
