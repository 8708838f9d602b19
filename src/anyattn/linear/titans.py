"""Titans linear memory (Behrouz, Zhong, Mirrokni, 2025, "Titans: Learning to Memorize at Test Time").

Per head, row vectors q_t, k_t `(1, D_k)`, v_t `(1, D_v)`; memory M and momentum ("surprise") S, both
`(D_k, D_v)`. The memory is trained online on the loss `1/2 |k M - v|^2` by gradient descent with
momentum and weight decay, one mini-batch of `chunk_size` C tokens at a time: inside a chunk every
gradient is taken at the chunk-start memory M_ref (C = 1: plain online gradient descent):

    S_t = eta_t S_{t-1} - theta_t k_t^T (k_t M_ref - v_t)
    M_t = (1 - alpha_t) M_{t-1} + S_t
    o_t = scale * q_t M_t                                     (read after write)

`mode="recurrent"` is this token loop (the oracle). `mode="chunk"` computes a whole chunk at once
(METHODS.md): with b_t = prod_{j<=t} (1 - alpha_j), m_t = prod_{j<=t} eta_j (inside the chunk),
E = K M_ref - V, L_b[t, s] = b_t / b_s, L_m[s, i] = m_s / m_i (lower triangles), G = L_b L_m, f = L_b m:

    O   = diag(b) Q M_0 + diag(f) Q S_0 - (G ⊙ Q K^T) diag(theta) E
    M_C = b_C M_0 + f_C S_0 - K^T diag(theta ⊙ G[C, :]) E
    S_C = m_C S_0 - K^T diag(theta ⊙ L_m[C, :]) E

L_b and L_m are built from masked cumulative sums of log(1 - alpha) and log(eta) (a product of
factors between s and t, never a ratio of products: alpha = 1 or eta = 0 are allowed); exact zeros
are taken as e^-80. Everything per chunk is batched over the chunks of a group (about GROUP_TOKENS
tokens); only `E = K M_ref - V` and the state update are a Python loop over chunks (N / C steps).

The state is a `TitansState(M, S, M_ref, offset)`: M_ref and offset (tokens already seen of the
current chunk) let a later call, or `titans_step`, continue in the middle of a chunk exactly.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..lse import EXP_FLOOR
from ..validate import check_positive_int, check_scale, check_tensor
from .ops import MODES, _check_float, _check_g, _check_qkv, _compute_dtype

# Tokens per group of chunks: the per-chunk matrices of a group are built at once (batched).
GROUP_TOKENS = 256


class TitansState(NamedTuple):
    """Titans memory state: M, S, M_ref `(B, H, D_k, D_v)` and `offset` (int), the number of tokens of
    the current chunk already consumed (M_ref is the memory at that chunk's start)."""

    M: torch.Tensor
    S: torch.Tensor
    M_ref: torch.Tensor
    offset: int


# ------------------------------------------------------------------------------------------ pieces

def _log_factor(a: torch.Tensor) -> torch.Tensor:
    """log(a) for a decay factor a in [0, 1]; exact zeros give EXP_FLOOR, with finite gradients."""
    pos = a > 0
    return torch.where(pos, torch.log(torch.where(pos, a, torch.ones_like(a))), torch.full_like(a, EXP_FLOOR))


def _log_keep(alpha: torch.Tensor) -> torch.Tensor:
    """log(1 - alpha), via log1p for small alpha; alpha = 1 gives EXP_FLOOR."""
    keep = alpha < 1
    return torch.where(keep, torch.log1p(-torch.where(keep, alpha, torch.zeros_like(alpha))),
                       torch.full_like(alpha, EXP_FLOOR))


def _segment_decay(l: torch.Tensor) -> torch.Tensor:
    """`L[t, s] = exp(sum_{s < j <= t} l_j)` for s <= t, 0 above: l `(..., C)` -> `(..., C, C)`.
    Each entry is its own masked cumulative sum (no difference of cumulative sums)."""
    C = l.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=l.device).tril(-1)
    x = l[..., :, None].expand(*l.shape, C).masked_fill(~strict, 0.0).cumsum(-2)
    return torch.exp(x.clamp(min=EXP_FLOOR)) * strict.logical_or(torch.eye(C, dtype=torch.bool, device=l.device))


def _chunk_coefficients(q, k, theta, la, le):
    """Per-chunk matrices for chunks `(..., C)`: q (scaled), k `(..., C, D_k)`, theta, la = log(1 - alpha),
    le = log(eta) `(..., C)`. Returns
    QQ = [diag(b) Q | diag(f) Q] `(..., C, 2 D_k)` (reads [M; S]),
    A = (G ⊙ Q K^T) diag(theta) `(..., C, C)`,
    WT = [K ⊙ theta G[C, :] | K ⊙ theta L_m[C, :]]^T `(..., 2 D_k, C)` (the state update from E),
    T = [[b_C, f_C], [0, m_C]] `(..., 2, 2)` (how [M; S] carries over the chunk)."""
    Lb, Lm = _segment_decay(la), _segment_decay(le)
    b = torch.exp(la.cumsum(-1).clamp(min=EXP_FLOOR))
    m = torch.exp(le.cumsum(-1).clamp(min=EXP_FLOOR))
    G = Lb @ Lm
    f = (Lb @ m[..., None])[..., 0]
    A = (q @ k.transpose(-1, -2)) * G * theta[..., None, :]
    QQ = torch.cat([q * b[..., None], q * f[..., None]], -1)
    WT = torch.cat([k * (theta * G[..., -1, :])[..., None], k * (theta * Lm[..., -1, :])[..., None]], -1).transpose(-1, -2)
    T = torch.stack([torch.stack([b[..., -1], f[..., -1]], -1),
                     torch.stack([torch.zeros_like(m[..., -1]), m[..., -1]], -1)], -2)
    return QQ, A, WT, T


def _chunks(q, k, v, theta, la, le, Y, M_ref, C):
    """Whole chunks: q (scaled), k `(BH, n*C, D_k)`, v `(BH, n*C, D_v)`, theta, la, le `(BH, n*C)`;
    Y = [M; S] `(BH, 2 D_k, D_v)`; M_ref `(BH, D_k, D_v)` the reference memory of the first chunk, or
    None (the later chunks use their start memory). Per group: the batched coefficients, then `_Loop`
    (5 ops per chunk). Returns (o `(BH, n*C, D_v)`, Y, the reference memory of the last chunk)."""
    BH, L, K = k.shape
    V = v.shape[-1]
    n = L // C
    per_group = max(1, GROUP_TOKENS // C)

    def cut(x):
        return x.reshape(BH, n, C, *x.shape[2:]).split(per_group, 1)

    outs = []
    for qg, kg, vg, tg, ag, eg in zip(*(cut(x) for x in (q, k, v, theta, la, le))):
        QQ, A, WT, T = _chunk_coefficients(qg, kg, tg, ag, eg)
        o, Y, ref = _Loop.apply(QQ, A, WT, T, kg, vg, Y, M_ref)
        M_ref = None
        outs.append(o)
    return torch.cat(outs, 1) if len(outs) > 1 else outs[0], Y, ref


def _loop(QQ, A, WT, T, k, v, Y, M_ref, keep: bool):
    """The chunk loop of one group: QQ `(BH, n, C, 2K)`, A `(BH, n, C, C)`, WT `(BH, n, 2K, C)`, T
    `(BH, n, 2, 2)`, k `(BH, n, C, K)`, v `(BH, n, C, V)`, Y `(BH, 2K, V)`, M_ref None or `(BH, K, V)`.
    Per chunk: E = K M_ref - V, O = QQ Y - A E, Y <- T Y - WT E (M_ref: the chunk's start memory Y[:K],
    or the given one for the first chunk). Returns (o `(BH, n*C, V)` when `keep`, else None; Y after the
    group; the last chunk's reference; and, when not `keep`, the lists of the states before each chunk,
    the E's and the references, for the backward)."""
    BH, n, C, K = k.shape
    V = v.shape[-1]
    outs, Ys, Es, refs = [], [], [], []
    for i in range(n):
        ref = Y[:, :K] if (i > 0 or M_ref is None) else M_ref
        E = torch.baddbmm(v[:, i], k[:, i], ref, beta=-1.0)                      # K M_ref - V
        if keep:
            outs.append(torch.baddbmm(QQ[:, i] @ Y, A[:, i], E, alpha=-1.0))
        else:
            Ys.append(Y)
            Es.append(E)
            refs.append(ref)
        Y = torch.baddbmm((T[:, i] @ Y.view(BH, 2, K * V)).view(BH, 2 * K, V), WT[:, i], E, alpha=-1.0)
    return (torch.cat(outs, 1) if keep else None), Y, ref, Ys, Es, refs


class _Loop(torch.autograd.Function):
    """The sequential part of one group of chunks with a hand-written backward: the forward keeps only the
    group's starting state; the backward recomputes the states and E's of its chunks (two ops per chunk),
    runs the recurrence backwards (dE = -A^T dO - WT^T dY', dY = QQ^T dO + T^T dY' + [K^T dE; 0]), and gets
    the gradients of QQ, A, WT, T, K, V as batched matmuls over the group's chunks."""

    @staticmethod
    def forward(ctx, QQ, A, WT, T, k, v, Y, M_ref):
        o, Y_out, ref, _, _, _ = _loop(QQ, A, WT, T, k, v, Y, M_ref, keep=True)
        ctx.save_for_backward(QQ, A, WT, T, k, v, Y, M_ref)
        return o, Y_out, ref.clone()

    @staticmethod
    def backward(ctx, do, dY, dref):
        QQ, A, WT, T, k, v, Y, M_ref = ctx.saved_tensors
        BH, n, C, K = k.shape
        V = v.shape[-1]
        _, _, _, Ys, Es, refs = _loop(QQ, A, WT, T, k, v, Y, M_ref, keep=False)
        do = do.view(BH, n, C, V)
        dY = torch.zeros_like(Y) if dY is None else dY
        dE_list, dnext, dM_ref = [None] * n, [None] * n, None
        for i in range(n - 1, -1, -1):
            dnext[i] = dY
            dE = torch.baddbmm(A[:, i].transpose(-1, -2) @ do[:, i], WT[:, i].transpose(-1, -2), dY).neg_()
            dE_list[i] = dE
            dR = k[:, i].transpose(-1, -2) @ dE
            if i == n - 1 and dref is not None:
                dR = dR + dref
            dY = torch.baddbmm((T[:, i].transpose(-1, -2) @ dY.reshape(BH, 2, K * V)).view(BH, 2 * K, V),
                               QQ[:, i].transpose(-1, -2), do[:, i])
            if i > 0 or M_ref is None:
                dY[:, :K] += dR
            else:
                dM_ref = dR
        Ys, Es, refs, dE, dnext = (torch.stack(x, 1) for x in (Ys, Es, refs, dE_list, dnext))
        flat = (lambda x: x.flatten(0, 1))
        dQQ = (flat(do) @ flat(Ys).transpose(-1, -2)).view_as(QQ)
        dA = (flat(do) @ flat(Es).transpose(-1, -2)).neg_().view_as(A)
        dWT = (flat(dnext) @ flat(Es).transpose(-1, -2)).neg_().view_as(WT)
        dT = (flat(dnext).reshape(BH * n, 2, K * V) @ flat(Ys).reshape(BH * n, 2, K * V).transpose(-1, -2)).view_as(T)
        dk = (flat(dE) @ flat(refs).transpose(-1, -2)).view_as(k)
        return dQQ, dA, dWT, dT, dk, dE.neg(), dY, dM_ref


# ------------------------------------------------------------------------------------- recurrence

def _step(q, k, v, theta, alpha, eta, state: TitansState, scale: float, C: int):
    """One token (the oracle's update). q, k `(B, H, D_k)`, v `(B, H, D_v)`, gates `(B, H)`."""
    M, S, M_ref, offset = state
    if offset == 0:
        M_ref = M
    err = (k[..., :, None] * M_ref).sum(-2) - v                                   # k M_ref - v
    S = eta[..., None, None] * S - theta[..., None, None] * k[..., :, None] * err[..., None, :]
    M = (1 - alpha)[..., None, None] * M + S
    o = scale * (q[..., :, None] * M).sum(-2)
    offset = (offset + 1) % C
    return o, TitansState(M, S, M if offset == 0 else M_ref, offset)


def _recurrent(q, k, v, theta, alpha, eta, state, scale, C):
    outs = []
    for t in range(q.shape[2]):
        o, state = _step(q[:, :, t], k[:, :, t], v[:, :, t], theta[:, :, t], alpha[:, :, t], eta[:, :, t],
                         state, scale, C)
        outs.append(o)
    return torch.stack(outs, 2), state


def _chunked(q, k, v, theta, alpha, eta, state: TitansState, scale: float, C: int):
    """Chunk form of the whole call: a head finishing the state's current chunk, whole chunks, and a
    tail (the start of a chunk the next call or step continues)."""
    B, H, N, K = k.shape
    V = v.shape[-1]
    la, le = _log_keep(alpha), _log_factor(eta)
    flat = [x.reshape(B * H, N, *x.shape[3:]) for x in (q * scale, k, v, theta, la, le)]
    Y = torch.cat([state.M, state.S], 2).reshape(B * H, 2 * K, V)
    M_ref = state.M_ref.reshape(B * H, K, V)
    offset = state.offset
    head = min((C - offset) % C, N)                       # tokens finishing the current chunk
    tail = (N - head) % C                                 # tokens starting the last, unfinished chunk
    body = N - head - tail
    pieces = [(n, c, r) for n, c, r in ((head, head, M_ref), (body, C, None), (tail, tail, None)) if n > 0]
    outs = []
    for (n, c, ref), parts in zip(pieces, zip(*(x.split([p[0] for p in pieces], 1) for x in flat))):
        o, Y, M_ref = _chunks(*parts, Y, ref, c)
        outs.append(o)
    o = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
    M, S = Y[:, :K], Y[:, K:]
    new_offset = (offset + N) % C
    if new_offset == 0:
        M_ref = M
    shape = (B, H, K, V)
    return o.reshape(B, H, N, V), TitansState(M.reshape(shape), S.reshape(shape), M_ref.reshape(shape), new_offset)


# ----------------------------------------------------------------------------------------- public

def _check_gates(theta, alpha, eta, ref, step: bool):
    """theta, alpha, eta of shape (B, H[, N]) with values in [0, 1]."""
    out = []
    for name, x in (("theta", theta), ("alpha", alpha), ("eta", eta)):
        x = _check_g(name + ("_t" if step else ""), x, ref, "scalar", step)
        if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"{name}{'_t' if step else ''} must lie in [0, 1], got values in "
                             f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
        out.append(x)
    return out


def _initial(state, ref, name: str, dt, chunk_size: int) -> TitansState:
    """A TitansState in the compute dtype: None -> zeros; a pair (M, S) -> at a chunk boundary."""
    B, H, _, K = ref.shape if ref.dim() == 4 else (ref.shape[0], ref.shape[1], None, ref.shape[2])
    if state is None:
        return None
    if isinstance(state, TitansState):
        parts, offset = (state.M, state.S, state.M_ref), state.offset
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < chunk_size:
            raise ValueError(f"{name}.offset must be an int in [0, chunk_size={chunk_size}), got {offset!r}")
    elif isinstance(state, (tuple, list)) and len(state) == 2:
        parts, offset = (state[0], state[1], state[0]), 0
    else:
        raise TypeError(f"{name} must be a TitansState or a pair (M, S), got {type(state).__name__}")
    for part, x in zip(("M", "S", "M_ref"), parts):
        check_tensor(f"{name}.{part}", x, 4)
        _check_float(f"{name}.{part}", x, ref)
        if tuple(x.shape[:3]) != (B, H, K):
            raise ValueError(f"{name}.{part} must have shape (B, H, D_k, D_v) with (B, H, D_k) = {(B, H, K)}, "
                             f"got {tuple(x.shape)}")
    return TitansState(*(x.to(dt) for x in parts), offset)


def _zeros(B, H, K, V, ref, dt):
    z = ref.new_zeros(B, H, K, V, dtype=dt)
    return TitansState(z, z, z, 0)


def _same_heads(q, k, qn="q", kn="k"):
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"{qn} must have {kn}'s number of heads {k.shape[1]} (titans has no grouped-query heads), "
                         f"got {q.shape[1]}")


def titans(q, k, v, theta, alpha, eta, *, chunk_size: int = 16, scale=None, initial_state=None,
           output_final_state: bool = False, mode: str = "chunk"):
    """Titans linear memory with momentum and weight decay (see the module docstring).

    q, k `(B, H, N, D_k)`, v `(B, H, N, D_v)`; theta (learning rate), alpha (weight decay / forgetting),
    eta (momentum) `(B, H, N)` in [0, 1] (any float dtype). chunk_size: the memory's mini-batch C
    (gradients at the chunk-start memory; part of the model, honoured by both modes). scale: multiplies
    the read (default `D_k ** -0.5`). initial_state: a `TitansState` or a pair `(M, S)` `(B, H, D_k, D_v)`
    (then at a chunk boundary); None: zeros. Returns o `(B, H, N, D_v)`, or `(o, TitansState)` with
    `output_final_state=True` (fp32 state, fp64 for fp64 inputs)."""
    _check_qkv(q, k, v)
    _same_heads(q, k)
    theta, alpha, eta = _check_gates(theta, alpha, eta, k, step=False)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    B, H, N, K = k.shape
    V = v.shape[-1]
    scale = check_scale(scale, K)
    dt = _compute_dtype(q)
    state = _initial(initial_state, k, "initial_state", dt, chunk_size) or _zeros(B, H, K, V, q, dt)
    args = (q.to(dt), k.to(dt), v.to(dt), theta.to(dt), alpha.to(dt), eta.to(dt), state, scale, chunk_size)
    o, state = _recurrent(*args) if mode == "recurrent" else _chunked(*args)
    o = o.to(q.dtype)
    return (o, state) if output_final_state else o


def titans_step(q_t, k_t, v_t, theta_t, alpha_t, eta_t, state=None, *, chunk_size: int = 16, scale=None):
    """One token of `titans`: q_t, k_t `(B, H, D_k)`, v_t `(B, H, D_v)`, theta_t, alpha_t, eta_t `(B, H)`,
    state a `TitansState` (or `(M, S)` at a chunk boundary, or None: zeros). Returns
    `(o_t (B, H, D_v), TitansState)`; the state knows where it is in its chunk of `chunk_size` tokens."""
    _check_qkv(q_t, k_t, v_t, step=True)
    _same_heads(q_t, k_t, "q_t", "k_t")
    theta_t, alpha_t, eta_t = _check_gates(theta_t, alpha_t, eta_t, k_t, step=True)
    check_positive_int("chunk_size", chunk_size)
    B, H, K = k_t.shape
    V = v_t.shape[-1]
    dt = _compute_dtype(q_t)
    state = _initial(state, k_t, "state", dt, chunk_size) or _zeros(B, H, K, V, q_t, dt)
    o, state = _step(q_t.to(dt), k_t.to(dt), v_t.to(dt), theta_t.to(dt), alpha_t.to(dt), eta_t.to(dt), state,
                     check_scale(scale, K), chunk_size)
    return o.to(q_t.dtype), state
