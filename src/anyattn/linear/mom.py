"""Mixture-of-Memories (Du et al., 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories").

Each head has M memories, each a Gated DeltaNet state with its own keys, values, log-decays and
betas; the query is shared. A router gives every token a weight per memory (a top-k router: nonzero
for the k chosen memories, zero for the others). Memory m is updated only at the tokens routed to
it (it neither decays nor learns at the others), and the output is the weighted sum of the reads:

    S^m_t = exp(g^m_t) (I - beta^m_t k^m_t k^m_t^T) S^m_{t-1} + beta^m_t k^m_t v^m_t^T    if w_{t,m} != 0
    S^m_t = S^m_{t-1}                                                                  if w_{t,m} == 0
    o_t = sum_m w_{t,m} scale S^m_t^T q_t

MoM's shared memory is one more memory whose weight is 1 at every token.

`mode="chunk"` gathers, per memory, the tokens routed to it into a compact sequence (per batch and
head; padded at the end to the longest with tokens that change nothing: k = v = 0, g = beta = 0),
runs the Gated DeltaNet chunk engine on it, and scatter-adds the weighted reads back: it costs what
the routed tokens cost (top-k of M routed memories: about k / M of running each on every token).
`mode="recurrent"` is the token loop above (the oracle).
"""
from __future__ import annotations

import torch

from ..validate import FLOAT_DTYPES, check_positive_int, check_scale, check_tensor
from . import recurrent as _rec
from .ops import MODES, _check_float, _check_shape, _compute_dtype, _run


def _check(q, k, v, g, beta, weights, step: bool):
    """Shapes: q (B, H, [N,] K); k (B, H, M, [N,] K); v (B, H, M, [N,] V); g, beta (B, H, M[, N]);
    weights (B, [N,] M) or (B, H, [N,] M). Returns weights expanded to (B, H, M[, N])."""
    t = "_t" if step else ""
    names = [n + t for n in ("q", "k", "v", "g", "beta", "w" if step else "weights")]
    check_tensor(names[0], q, 3 if step else 4)
    check_tensor(names[1], k, 4 if step else 5)
    check_tensor(names[2], v, 4 if step else 5)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names[0]} must have a floating dtype {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}")
    for name, x in zip(names[1:], (k, v, g, beta, weights)):
        check_tensor(name, x)
        _check_float(name, x, q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{names[1]} and {names[2]} must have {names[0]}'s dtype {q.dtype}, got {k.dtype} and {v.dtype}")
    B, H = q.shape[:2]
    M = k.shape[2]
    lead = (B, H, M) + (() if step else (q.shape[2],))
    dims = "(B, H, M)" if step else "(B, H, M, N)"
    if tuple(k.shape) != lead + (q.shape[-1],):
        raise ValueError(f"{names[1]} must have shape {dims[:-1]}, D_k) = {lead + (q.shape[-1],)}, got {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != lead or v.shape[-1] == 0:
        raise ValueError(f"{names[2]} must have shape {dims[:-1]}, D_v) with {dims} = {lead}, got {tuple(v.shape)}")
    for name, x in zip(names[3:5], (g, beta)):
        if tuple(x.shape) != lead:
            raise ValueError(f"{name} must have shape {dims} = {lead}, got {tuple(x.shape)}")
    per_token = () if step else (q.shape[2],)
    shared, per_head = (B,) + per_token + (M,), (B, H) + per_token + (M,)
    if tuple(weights.shape) == shared:
        weights = weights.unsqueeze(1)
    elif tuple(weights.shape) != per_head:
        wd, wh = ("(B, M)", "(B, H, M)") if step else ("(B, N, M)", "(B, H, N, M)")
        raise ValueError(f"{names[5]} must have shape {wd} = {shared} or {wh} = {per_head}, got {tuple(weights.shape)}")
    return weights.movedim(-1, 2).expand(lead)


def _state(name, state, shape, ref, dt):
    """The memories' state `(B, H, M, D_k, D_v)` in the compute dtype; None: zeros."""
    if state is None:
        return ref.new_zeros(shape, dtype=dt)
    _check_shape(name, state, shape, "(B, H, M, D_k, D_v)", ref)
    return state.to(dt)


def _recurrent(q, k, v, g, beta, w, scale, S):
    """The token loop (oracle). q (B, H, N, K); k (B, H, M, N, K); v (B, H, M, N, V); g, beta, w
    (B, H, M, N); S (B, H, M, K, V). Returns (o (B, H, N, V), S)."""
    B, H, M, N, K = k.shape
    outs = []
    for t in range(N):
        o, S = _step(q[:, :, t], k[:, :, :, t], v[:, :, :, t], g[..., t], beta[..., t], w[..., t], scale, S)
        outs.append(o)
    return torch.stack(outs, 2), S


def _step(q, k, v, g, beta, w, scale, S):
    """One token: q (B, H, K), k (B, H, M, K), v (B, H, M, V), g, beta, w (B, H, M), S (B, H, M, K, V)."""
    B, H, M, K = k.shape
    V = v.shape[-1]
    o, S_new = _rec.step(q[:, :, None, None].expand(B, H, M, 1, K).reshape(B, H * M, 1, K), k.reshape(B, H * M, K),
                         v.reshape(B, H * M, V), S.reshape(B, H * M, K, V), scale, g.reshape(B, H * M),
                         beta.reshape(B, H * M))
    routed = w != 0
    S = torch.where(routed[..., None, None], S_new.view(B, H, M, K, V), S)
    read = torch.where(routed[..., None], o.view(B, H, M, V), 0.0)   # memories not routed are not read
    return (w[..., None] * read).sum(2), S


def _gather_tokens(x, order):
    """x (B, H, N, ...) -> (B, H, L, ...) at the positions `order` (B, H, L)."""
    idx = order.view(*order.shape, *([1] * (x.dim() - 3))).expand(*order.shape, *x.shape[3:])
    return x.gather(2, idx)


def _chunk(q, k, v, g, beta, w, scale, S0, chunk_size):
    """One chunk-engine call per memory, on the tokens routed to it (their count L_m: the most over
    batch and heads; shorter sequences are padded at the end with tokens that change nothing)."""
    B, H, M, N, K = k.shape
    V = v.shape[-1]
    routed = w != 0
    # routed tokens first, in their order (stable sort): the first L_m positions of memory m are its tokens
    order = torch.sort((~routed).to(torch.uint8), dim=-1, stable=True).indices   # (B, H, M, N)
    counts = routed.sum(-1).amax((0, 1)).tolist()                                  # L_m per memory
    out = q.new_zeros(B, H, N, V)
    states = []
    # unbind, not indexing, per memory: the backward of one unbind is one stack, whereas each index's
    # backward would materialize a zero tensor of all M memories
    per_memory = zip(counts, order.unbind(2), routed.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2),
                     beta.unbind(2), w.unbind(2), S0.unbind(2))
    for L, order_m, routed_m, k_m, v_m, g_m, beta_m, w_m, S0_m in per_memory:
        if L == 0:
            states.append(S0_m)
            continue
        idx = order_m[..., :L]
        keep = routed_m.gather(-1, idx).to(k.dtype)
        o, S = _run(_gather_tokens(q, idx), _gather_tokens(k_m, idx) * keep[..., None],
                    _gather_tokens(v_m, idx) * keep[..., None], g=_gather_tokens(g_m, idx) * keep,
                    beta=_gather_tokens(beta_m, idx) * keep, delta=True, scale=scale, initial_state=S0_m,
                    output_final_state=True, mode="chunk", chunk_size=chunk_size)
        weight = _gather_tokens(w_m, idx) * keep                       # 0 (and no gradient) on the padding
        out = out.scatter_add(2, idx[..., None].expand(B, H, L, V), o * weight[..., None])
        states.append(S)
    return out, torch.stack(states, 2)


def mom(q, k, v, g, beta, weights, *, scale=None, initial_state=None, output_final_state: bool = False,
        mode: str = "chunk", chunk_size: int = 64):
    """Mixture-of-Memories with Gated DeltaNet memories (see the module docstring).

    q `(B, H, N, D_k)` (shared by the memories); k `(B, H, M, N, D_k)`, v `(B, H, M, N, D_v)`,
    g <= 0 and beta `(B, H, M, N)` (per memory); weights `(B, N, M)` (one router for all heads) or
    `(B, H, N, M)`: memory m is routed token t where `weights[..., t, m] != 0`. initial_state
    `(B, H, M, D_k, D_v)`. Returns `o (B, H, N, D_v)`, or `(o, S_N (B, H, M, D_k, D_v))` with
    `output_final_state=True`. Gradients flow to every input and to the weights of the routed
    memories (the routing choice itself, which weights are zero, is not differentiable)."""
    w = _check(q, k, v, g, beta, weights, step=False)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    B, H, M, N, K = k.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    dt = _compute_dtype(q)
    S0 = _state("initial_state", initial_state, (B, H, M, K, V), q, dt)
    args = (q.to(dt), k.to(dt), v.to(dt), g.to(dt), beta.to(dt), w.to(dt), scale, S0)
    o, S = _recurrent(*args) if mode == "recurrent" else _chunk(*args, chunk_size)
    o = o.to(q.dtype)
    return (o, S) if output_final_state else o


def mom_step(q_t, k_t, v_t, g_t, beta_t, w_t, state=None, *, scale=None):
    """One token of `mom`: q_t `(B, H, D_k)`, k_t `(B, H, M, D_k)`, v_t `(B, H, M, D_v)`, g_t, beta_t
    `(B, H, M)`, w_t `(B, M)` or `(B, H, M)`, state `(B, H, M, D_k, D_v)` or None (zeros).
    Returns `(o_t (B, H, D_v), state)`."""
    w = _check(q_t, k_t, v_t, g_t, beta_t, w_t, step=True)
    B, H, M, K = k_t.shape
    V = v_t.shape[-1]
    dt = _compute_dtype(q_t)
    S = _state("state", state, (B, H, M, K, V), q_t, dt)
    o, S = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), g_t.to(dt), beta_t.to(dt), w.to(dt),
                 check_scale(scale, K), S)
    return o.to(q_t.dtype), S
