"""Chunkwise engines of the linear family, in plain PyTorch ops (any device, autograd backward).

The sequence is cut into chunks of C tokens (padded at the end with tokens that change nothing:
k = v = 0, beta = 0, g = 0). With Γ the cumulative log-decay inside a chunk (per position, scalar
or per key channel), for every chunk at once (batched matmuls):

    A[r, c] = sum_d a[r, d] b[c, d] exp(Γ[r, d] - Γ[c, d])    (c <= r; the "decayed gram")

and only the inter-chunk state recurrence is a Python loop over the N / C chunks.

Two engines share these pieces:

* `chunk_decay_attention` — linear attention, retention / Lightning (scalar decay), GLA (per-channel
  decay):  O = (Q ⊙ e^Γ) S_n + A_qk V,   S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T V.
* `chunk_delta` — DeltaNet (no decay), Gated DeltaNet (scalar), KDA (per channel), via the WY / UT
  transform:  T = (I + β ⊙ A_kk^strict)^{-1} Diag(β) (one batched unit-triangular solve),
  W = T (e^Γ ⊙ K), U = T V, then per chunk Ṽ = U - W S_n,  O = (Q ⊙ e^Γ) S_n + A_qk Ṽ,
  S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T Ṽ.

Numerical care for per-channel decay: exp is only ever taken of non-positive numbers. The decayed
gram is computed hierarchically: the chunk is split into 4 sub-blocks; a pair of sub-blocks
(i > j) uses the reference Γ_end(j) (last position of block j):
`(a_r e^{Γ_r - Γ_end(j)}) . (b_c e^{Γ_end(j) - Γ_c})`, both factors <= 1; diagonal sub-blocks
recurse, down to blocks of <= 4 tokens where `exp(Γ_r - Γ_c)` is formed per element for c <= r
only (masked to -inf before exp). So decays of any strength give no inf / NaN.

Inputs are validated and already in the compute dtype (fp32 or fp64); `scale` is applied here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_MIN_BLOCK = 4


def _floor(x: torch.Tensor) -> float:
    """Lowest log-factor that is exponentiated: below it exp() would give subnormal numbers, which
    slow CPUs down by orders of magnitude (and are far below the dtype's resolution relative to
    the unit-decay terms that every row has). e^-40 ~ 4e-18 in fp32, e^-300 in fp64."""
    return -300.0 if x.dtype == torch.float64 else -40.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    """exp of a non-positive log-factor, clamped at `_floor` so no subnormal is produced."""
    return torch.exp(x.clamp_min(_floor(x)))


def _exp_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x) where `keep`, exactly 0 elsewhere (x is never exponentiated where masked)."""
    return torch.exp(x.clamp_min(_floor(x)).masked_fill(~keep, float("-inf")))


def _tril_mask(L: int, device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(diagonal)


def _pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad dim 2 (time) of `(B, H, N)` or `(B, H, N, D)` with zeros at the end."""
    if pad == 0:
        return x
    if x.dim() == 3:
        return F.pad(x, (0, pad))
    return F.pad(x, (0, 0, 0, pad))


def _to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    B, H, N = x.shape[:3]
    return x.reshape(B, H, N // C, C, *x.shape[3:])


def chunk_log_decay(g: torch.Tensor, C: int) -> torch.Tensor:
    """In-chunk cumulative log-decay Γ: `(B, H, N[, D])` -> `(B, H, N / C, C[, D])`."""
    return _to_chunks(g, C).cumsum(3)


def gram_scalar(a, b, G, diagonal: int = 0):
    """`(a b^T) ⊙ exp(G_r - G_c)` on the lower triangle (c <= r + diagonal, diagonal 0 or -1), 0 above.
    a, b `(..., L, K)`, G `(..., L)` or None (no decay)."""
    L = a.shape[-2]
    s = a @ b.transpose(-1, -2)
    mask = _tril_mask(L, a.device, diagonal)
    if G is None:
        return s.masked_fill(~mask, 0.0)
    return s * _exp_masked(G[..., :, None] - G[..., None, :], mask)


def gram_vector(a, b, G):
    """Decayed gram with per-channel decay: `M[r, c] = sum_d a[r,d] b[c,d] exp(G[r,d] - G[c,d])`
    for c <= r, 0 above. b, G `(..., L, K)`; a `(..., L, K)` or with extra leading dims that
    broadcast (e.g. q and k stacked). Never exponentiates a positive number (for G non-increasing)."""
    L, K = G.shape[-2], G.shape[-1]
    if L <= _MIN_BLOCK or L % 2 != 0:
        mask = _tril_mask(L, G.device)
        eb = _exp_masked(G[..., :, None, :] - G[..., None, :, :], mask[:, :, None]) * b[..., None, :, :]                     # (..., L_r, L_c, K)
        return (eb @ a[..., :, :, None]).squeeze(-1)                  # (..., L_r, L_c)
    nb = 4 if L % 4 == 0 else 2
    s = L // nb
    a_ = a.reshape(*a.shape[:-2], nb, s, K)
    b_ = b.reshape(*b.shape[:-2], nb, s, K)
    G_ = G.reshape(*G.shape[:-2], nb, s, K)
    ii, jj = torch.tril_indices(nb, nb, -1, device=G.device)
    g_end = G_[..., :, s - 1, :]                                      # (..., nb, K)
    qs = a_[..., ii, :, :] * _exp(G_[..., ii, :, :] - g_end[..., jj, None, :])
    kt = b_ * _exp(g_end[..., :, None, :] - G_)                  # (..., nb, s, K)
    pairs = qs @ kt[..., jj, :, :].transpose(-1, -2)                  # (..., P, s, s)
    diag = gram_vector(a_, b_, G_)                                    # (..., nb, s, s)
    batch = torch.broadcast_shapes(pairs.shape[:-3], diag.shape[:-3])
    M = pairs.new_zeros(*batch, nb, nb, s, s)
    M[..., ii, jj, :, :] = pairs
    di = torch.arange(nb, device=G.device)
    M[..., di, di, :, :] = diag
    return M.transpose(-3, -2).reshape(*batch, L, L)


def solve_unit_lower(A: torch.Tensor, R: torch.Tensor, block: int = 16) -> torch.Tensor:
    """Solve `(I + A) X = R` for strictly lower-triangular A `(..., C, C)`, R `(..., C, M)`.

    Batched, matmul-only: the inverse of each `block x block` diagonal block is the finite Neumann
    series `sum_j (-A_ii)^j = prod_k (I + (-A_ii)^(2^k))` (A_ii is nilpotent, so it is exact), and
    the blocks are then eliminated by block forward substitution (C / block steps).
    Same result as `torch.linalg.solve_triangular(A, R, upper=False, unitriangular=True)`, but it
    runs as a few large batched matmuls: LAPACK's batched trsm calls threaded BLAS once per
    matrix, which becomes 100x slower when the CPU is shared with other processes."""
    C = A.shape[-1]
    b = block if C % block == 0 else C
    nb = C // b
    batch = A.shape[:-2]
    eye = torch.eye(b, dtype=A.dtype, device=A.device)
    diag = A.reshape(*batch, nb, b, nb, b).diagonal(dim1=-4, dim2=-2).permute(*range(len(batch)), -1, -3, -2)
    N = -diag                                                         # (..., nb, b, b)
    P, M = eye + N, N
    for _ in range(max(0, (b - 1).bit_length() - 1)):
        M = M @ M
        P = P + P @ M
    if nb == 1:
        return P[..., 0, :, :] @ R
    xs = []
    for i in range(nb):
        rhs = R[..., i * b:(i + 1) * b, :]
        if i:
            rhs = rhs - A[..., i * b:(i + 1) * b, :i * b] @ torch.cat(xs, -2)
        xs.append(P[..., i, :, :] @ rhs)
    return torch.cat(xs, -2)


def _decay_factors(G, qc, kc):
    """(Q ⊙ e^Γ, e^{Γ_C - Γ} ⊙ K, e^{Γ_C} shaped to multiply the state (..., K or 1, 1))."""
    if G is None:
        return qc, kc, None
    if G.dim() == qc.dim() - 1:                                       # scalar decay (B, H, NC, C)
        g_last = G[..., -1:]
        return qc * _exp(G)[..., None], kc * _exp(g_last - G)[..., None], _exp(g_last)[..., None]
    g_last = G[..., -1:, :]                                           # (B, H, NC, 1, K)
    return qc * _exp(G), kc * _exp(g_last - G), _exp(g_last).transpose(-1, -2)


def _state_scan(S, d, dS):
    """S_{n+1} = d_n ⊙ S_n + dS_n over chunks (dim 2). Returns (S_n for each chunk stacked, S_NC)."""
    if d is None:
        cs = dS.cumsum(2)
        prev = torch.cat([torch.zeros_like(cs[:, :, :1]), cs[:, :, :-1]], 2) + S[:, :, None]
        return prev, cs[:, :, -1] + S
    states = []
    for d_n, dS_n in zip(d.unbind(2), dS.unbind(2)):
        states.append(S)
        S = d_n * S + dS_n
    return torch.stack(states, 2), S


def _prepare(q, k, v, scale, g, initial_state, chunk_size, extra=()):
    B, H, N, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, N)
    pad = (-N) % C
    q = _pad_time(q * scale, pad)
    k, v = _pad_time(k, pad), _pad_time(v, pad)
    G = None if g is None else chunk_log_decay(_pad_time(g, pad), C)
    extra = tuple(_to_chunks(_pad_time(x, pad), C) for x in extra)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state
    return (B, H, N, K, V, C), _to_chunks(q, C), _to_chunks(k, C), _to_chunks(v, C), G, S, extra


def chunk_decay_attention(q, k, v, scale: float, g=None, initial_state=None, chunk_size: int = 64):
    """Causal linear attention with optional decay. q, k `(B, H, N, K)`, v `(B, H, N, V)`,
    g None | `(B, H, N)` (scalar log-decay) | `(B, H, N, K)` (per channel), initial_state
    `(B, H, K, V)` or None. Returns `(o (B, H, N, V), S_N (B, H, K, V))`."""
    (B, H, N, K, V, C), qc, kc, vc, G, S, _ = _prepare(q, k, v, scale, g, initial_state, chunk_size)
    if G is None or G.dim() == 4:
        A = gram_scalar(qc, kc, G)
    else:
        A = gram_vector(qc, kc, G)
    qd, kd, d = _decay_factors(G, qc, kc)
    dS = kd.transpose(-1, -2) @ vc                                    # (B, H, NC, K, V)
    prev, S = _state_scan(S, d, dS)
    o = A @ vc + qd @ prev
    return o.reshape(B, H, -1, V)[:, :, :N], S


def chunk_delta(q, k, v, beta, scale: float, g=None, initial_state=None, chunk_size: int = 64):
    """Delta-rule family. q, k `(B, H, N, K)`, v `(B, H, N, V)`, beta `(B, H, N)`, g None (DeltaNet)
    | `(B, H, N)` (Gated DeltaNet) | `(B, H, N, K)` (KDA). Returns `(o, S_N)`."""
    (B, H, N, K, V, C), qc, kc, vc, G, S, (bc,) = _prepare(
        q, k, v, scale, g, initial_state, chunk_size, extra=(beta,))
    if G is not None and G.dim() == 5:
        M = gram_vector(torch.stack([qc, kc]), kc, G)
        A_qk, A_kk = M[0], M[1]
    else:
        M = gram_scalar(torch.stack([qc, kc]), kc, G)
        A_qk, A_kk = M[0], M[1]
    A_kk = A_kk.tril(-1) * bc[..., :, None]
    qd, kd, d = _decay_factors(G, qc, kc)
    kg = kc if G is None else (kc * _exp(G)[..., None] if G.dim() == 4 else kc * _exp(G))
    rhs = torch.cat([kg, vc], -1) * bc[..., None]
    X = solve_unit_lower(A_kk, rhs)
    W, U = X[..., :K], X[..., K:]
    states, news = [], []
    dn = [None] * W.shape[2] if d is None else d.unbind(2)
    for W_n, U_n, kd_n, d_n in zip(W.unbind(2), U.unbind(2), kd.unbind(2), dn):
        states.append(S)
        v_new = U_n - W_n @ S
        news.append(v_new)
        upd = kd_n.transpose(-1, -2) @ v_new
        S = S + upd if d_n is None else d_n * S + upd
    prev = torch.stack(states, 2)
    v_new = torch.stack(news, 2)
    o = qd @ prev + A_qk @ v_new
    return o.reshape(B, H, -1, V)[:, :, :N], S
