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


def _exp_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x) where `keep`, exactly 0 elsewhere (x is never exponentiated where masked)."""
    return torch.exp(x.masked_fill(~keep, float("-inf")))


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


def decay_matrix(G: torch.Tensor) -> torch.Tensor:
    """`exp(G_r - G_c)` for c <= r, exactly 0 above: G `(..., L)` -> `(..., L, L)`; the exponent is
    masked to -inf before exp, so nothing positive is ever exponentiated."""
    L = G.shape[-1]
    d = G[..., :, None] - G[..., None, :]
    d.masked_fill_(~_tril_mask(L, G.device), float("-inf"))
    return d.exp_()


def gram_scalar(a, b, G, diagonal: int = 0):
    """`(a b^T) ⊙ exp(G_r - G_c)` on the lower triangle (c <= r + diagonal, diagonal 0 or -1), 0 above.
    a, b `(..., L, K)`, G `(..., L)` or None (no decay)."""
    L = a.shape[-2]
    s = a @ b.transpose(-1, -2)
    mask = _tril_mask(L, a.device, diagonal)
    if G is None:
        return s.masked_fill(~mask, 0.0)
    return s * decay_matrix(G) if diagonal == 0 else s * decay_matrix(G).tril(diagonal)


def _gram_lags(a, b, G):
    """Base case of `gram_vector` for short blocks (L <= 4): one sub-diagonal (lag) at a time, so
    `exp(G_r - G_c)` is only formed for c < r (the diagonal has factor 1): about (L-1)/2 exps per
    element of a instead of L."""
    L = G.shape[-2]
    M = torch.diag_embed((a * b).sum(-1))
    for lag in range(1, L):
        e = torch.exp(G[..., lag:, :] - G[..., :-lag, :])             # <= 1
        d = (a[..., lag:, :] * (b[..., :-lag, :] * e)).sum(-1)
        M = M + torch.diag_embed(d, offset=-lag)
    return M


def gram_vector(a, b, G):
    """Decayed gram with per-channel decay: `M[r, c] = sum_d a[r,d] b[c,d] exp(G[r,d] - G[c,d])`
    for c <= r, 0 above. b, G `(..., L, K)`; a `(..., L, K)` or with extra leading dims that
    broadcast (e.g. q and k stacked). Never exponentiates a positive number (for G non-increasing).

    Hierarchical: split into nb = 4 sub-blocks; pair (i > j) uses the reference Γ_end(j):
    `(a_i e^{Γ_i - Γ_end(j)}) (b_j e^{Γ_end(j) - Γ_j})^T` (both factors <= 1) as one matmul;
    diagonal sub-blocks recurse; blocks of <= 4 rows (or odd length) go by lags."""
    L, K = G.shape[-2], G.shape[-1]
    if L <= 4 or L % 4 != 0:
        if L <= 4:
            return _gram_lags(a, b, G)
        mask = _tril_mask(L, G.device)
        eb = _exp_masked(G[..., :, None, :] - G[..., None, :, :], mask[:, :, None]) * b[..., None, :, :]
        return (eb @ a[..., :, :, None]).squeeze(-1)                  # (..., L_r, L_c)
    nb = 4
    s = L // nb
    a_ = a.reshape(*a.shape[:-2], nb, s, K)
    b_ = b.reshape(*b.shape[:-2], nb, s, K)
    G_ = G.reshape(*G.shape[:-2], nb, s, K)
    g_end = G_[..., :, s - 1:, :]                                     # (..., nb, 1, K)
    diag = gram_vector(a_, b_, G_)                                    # (..., nb, s, s)
    batch = torch.broadcast_shapes(diag.shape[:-3], G.shape[:-2])
    M = diag.new_zeros(*batch, nb, s, nb, s)
    for j in range(nb - 1):
        ref = g_end[..., j:j + 1, :, :]
        kt = b_[..., j:j + 1, :, :] * torch.exp(ref - G_[..., j:j + 1, :, :])        # (..., 1, s, K)
        qs = a_[..., j + 1:, :, :] * torch.exp(G_[..., j + 1:, :, :] - ref)          # (..., nb-j-1, s, K)
        M[..., j + 1:, :, j, :] = qs @ kt.transpose(-1, -2)                           # (..., nb-j-1, s, s)
    for i in range(nb):
        M[..., i, :, i, :] = diag[..., i, :, :]
    return M.reshape(*batch, L, L)


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
    if not (torch.is_grad_enabled() and (A.requires_grad or R.requires_grad)):
        # inference: write the blocks into one buffer (no per-block copies)
        X = torch.empty(torch.broadcast_shapes(A.shape[:-2], R.shape[:-2]) + R.shape[-2:], dtype=R.dtype,
                        device=R.device)
        for i in range(nb):
            rows = slice(i * b, (i + 1) * b)
            rhs = R[..., rows, :]
            if i:
                rhs = rhs - A[..., rows, :i * b] @ X[..., :i * b, :]
            torch.matmul(P[..., i, :, :], rhs, out=X[..., rows, :])
        return X
    xs = []
    for i in range(nb):
        rhs = R[..., i * b:(i + 1) * b, :]
        for j in range(i):
            rhs = rhs - A[..., i * b:(i + 1) * b, j * b:(j + 1) * b] @ xs[j]
        xs.append(P[..., i, :, :] @ rhs)
    return torch.cat(xs, -2)


def _decay_factors(G, qc, kc):
    """(Q ⊙ e^Γ, e^{Γ_C - Γ} ⊙ K, e^{Γ_C} shaped to multiply the state (..., K or 1, 1))."""
    if G is None:
        return qc, kc, None
    if G.dim() == qc.dim() - 1:                                       # scalar decay (B, H, NC, C)
        g_last = G[..., -1:]
        return qc * torch.exp(G)[..., None], kc * torch.exp(g_last - G)[..., None], torch.exp(g_last)[..., None]
    g_last = G[..., -1:, :]                                           # (B, H, NC, 1, K)
    return qc * torch.exp(G), kc * torch.exp(g_last - G), torch.exp(g_last).transpose(-1, -2)


def _state_scan(S, d, dS):
    """S_{n+1} = d_n ⊙ S_n + dS_n over chunks (dim 2). Returns (S_n for each chunk stacked, S_NC)."""
    if d is None:
        cs = dS.cumsum(2)
        prev = torch.cat([torch.zeros_like(cs[:, :, :1]), cs[:, :, :-1]], 2) + S[:, :, None]
        return prev, cs[:, :, -1] + S
    states = []
    for d_n, dS_n in zip(d.unbind(2), dS.unbind(2)):
        states.append(S)
        S = torch.addcmul(dS_n, d_n, S)
    return torch.stack(states, 2), S


def _delta_scan(S, W, U, kd, d):
    """Per chunk: Ṽ_n = U_n - W_n S_n; S_{n+1} = d_n S_n + kd_n^T Ṽ_n (the only Python loop)."""
    B, H, NC, C, K = W.shape
    V = U.shape[-1]

    def lead(x):
        return x.permute(2, 0, 1, 3, 4).reshape(NC, B * H, *x.shape[3:])

    Wt, Ut, kdT = lead(W), lead(U), lead(kd.transpose(-1, -2))
    dt = None if d is None else lead(d.expand(B, H, NC, *d.shape[3:]))
    S = S.reshape(B * H, K, V)
    states, news = [], []
    for n in range(NC):
        states.append(S)
        v_new = torch.baddbmm(Ut[n], Wt[n], S, alpha=-1.0)
        news.append(v_new)
        S = torch.baddbmm(S if dt is None else S * dt[n], kdT[n], v_new)
    prev = torch.stack(states, 0).reshape(NC, B, H, K, V).permute(1, 2, 0, 3, 4)
    v_new = torch.stack(news, 0).reshape(NC, B, H, C, V).permute(1, 2, 0, 3, 4)
    return prev, v_new, S.reshape(B, H, K, V)


def _prepare(q, k, v, scale, g, initial_state, chunk_size, extra=()):
    B, H, N, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, -(-N // 4) * 4)  # short inputs: one chunk, padded to a multiple of 4
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
    kT = kc.transpose(-1, -2)
    if G is not None and G.dim() == 5:
        M = gram_vector(torch.stack([qc, kc]), kc, G)
        A_qk, A_kk = M[0], M[1]
    elif G is None:
        A_qk, A_kk = (qc @ kT).tril(), kc @ kT
    else:
        E = decay_matrix(G)
        A_qk, A_kk = (qc @ kT) * E, (kc @ kT) * E
    A_kk = A_kk.tril(-1) * bc[..., :, None]
    qd, kd, d = _decay_factors(G, qc, kc)
    if G is None:
        kg = kc * bc[..., None]
    elif G.dim() == 4:
        kg = kc * (torch.exp(G) * bc)[..., None]
    else:
        kg = kc * (torch.exp(G) * bc[..., None])
    rhs = torch.cat([kg, vc * bc[..., None]], -1)
    X = solve_unit_lower(A_kk, rhs)                                   # [W | U]: (..., C, K + V)
    prev, v_new, S = _delta_scan(S, X[..., :K], X[..., K:], kd, d)
    o = qd @ prev + A_qk @ v_new
    return o.reshape(B, H, -1, V)[:, :, :N], S
