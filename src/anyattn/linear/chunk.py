"""Chunkwise engines of the linear family, in plain PyTorch ops (any device, autograd backward).

The sequence is cut into chunks of C tokens (padded at the end with tokens that change nothing:
k = v = 0, beta = 0, g = 0). With Γ the cumulative log-decay inside a chunk (per position, scalar
or per key channel), for every chunk at once (batched matmuls):

    A[r, c] = sum_d a[r, d] b[c, d] exp(Γ[r, d] - Γ[c, d])    (c <= r; the "decayed gram")

and only the inter-chunk state recurrence is a Python loop over the N / C chunks. Both engines work
through the sequence in groups of chunks (DECAY_GROUP_TOKENS, GROUP_TOKENS tokens), so each group's
temporaries stay small and in cache. Grouped-query heads: q carries Gq query heads per key head,
stacked as Gq * C rows of each chunk.

Two engines share these pieces:

* `chunk_decay_attention` — linear attention, retention / Lightning (scalar decay), GLA (per-channel
  decay):  O = (Q ⊙ e^Γ) S_n + A_qk V,   S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T V.
* `chunk_delta` — DeltaNet (no decay), Gated DeltaNet (scalar), KDA (per channel), via the WY / UT
  transform:  T = (I + β ⊙ A_kk^strict)^{-1} Diag(β) (one batched unit-triangular solve),
  W = T (e^Γ ⊙ K), U = T V, then per chunk Ṽ = U - W S_n,  O = (Q ⊙ e^Γ) S_n + A_qk Ṽ,
  S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T Ṽ.
  Its two phases are also exposed: `delta_prepare` (everything state-independent, every group) and
  `delta_scan` (the state passing, for any block of (batch, head) rows), for pipelines that scan
  while the entering state is still on its way.

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

from ..lse import EXP_FLOOR

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
    """`exp(G_r - G_c)` for c <= r, exactly 0 above: G `(..., L)` non-increasing -> `(..., L, L)`.

    The exponent is clamped to [EXP_FLOOR, 0] before exp (nothing positive is exponentiated, and no
    denormal results: both are slow paths of CPU exp; a factor below e^-80 is negligible next to the
    diagonal's 1), then the upper triangle is multiplied by 0."""
    L = G.shape[-1]
    e = torch.exp(torch.clamp(G[..., :, None] - G[..., None, :], EXP_FLOOR, 0.0))
    return e * _tril_mask(L, G.device).to(e.dtype)


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
    """Solve `(I + A) X = R` for strictly lower-triangular A `(M, C, C)`, R `(M, C, F)`.

    Batched and matmul-only: the inverse of each `block x block` diagonal block is the finite Neumann
    series `sum_j (-A_ii)^j = prod_k (I + (-A_ii)^(2^k))` (A_ii is nilpotent, so it is exact), then
    block forward substitution over the C / block row blocks. Same result as
    `torch.linalg.solve_triangular(I + A, R, upper=False, unitriangular=True)`, which on CPU calls
    LAPACK once per matrix and is several times slower for these small systems."""
    C = A.shape[-1]
    b = block if C % block == 0 else C
    nb = C // b
    diag = A.reshape(-1, nb, b, nb, b).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (M, nb, b, b)
    N = -diag
    P, Np = N + torch.eye(b, dtype=A.dtype, device=A.device), N
    for _ in range(max(0, (b - 1).bit_length() - 1)):
        Np = Np @ Np
        P = P + P @ Np
    if nb == 1:
        return P[:, 0] @ R
    # split (not slicing): one backward concatenation instead of a zero-filled full tensor per slice
    blocks = [row.split(b, 2) for row in A.split(b, 1)]
    xs = []
    for i, (P_i, rhs) in enumerate(zip(P.unbind(1), R.split(b, 1))):
        for j in range(i):
            rhs = torch.baddbmm(rhs, blocks[i][j], xs[j], alpha=-1.0)
        xs.append(torch.bmm(P_i, rhs))
    return torch.cat(xs, 1)


def _decay_factors(G, qc, kc):
    """(Q ⊙ e^Γ, e^{Γ_C - Γ} ⊙ K, e^{Γ_C} shaped to multiply the state (..., K or 1, 1)).
    qc `(..., Gq, C, K)` (Gq query heads per key head), kc `(..., C, K)`, G `(..., C)` or `(..., C, K)`."""
    if G is None:
        return qc, kc, None
    if G.dim() == kc.dim() - 1:                                       # scalar decay (..., C)
        g_last = G[..., -1:]
        return (qc * torch.exp(G)[..., None, :, None], kc * torch.exp(g_last - G)[..., None],
                torch.exp(g_last)[..., None])
    g_last = G[..., -1:, :]                                           # (..., 1, K)
    return qc * torch.exp(G)[..., None, :, :], kc * torch.exp(g_last - G), torch.exp(g_last).transpose(-1, -2)


def _state_scan(S, d, dS):
    """S_{n+1} = d_n ⊙ S_n + dS_n over chunks (dim 1 of `(BH, n, K, V)`). Returns (S_n for each chunk
    stacked, S after the last)."""
    if d is None:
        cs = dS.cumsum(1)
        prev = torch.cat([torch.zeros_like(cs[:, :1]), cs[:, :-1]], 1) + S[:, None]
        return prev, cs[:, -1] + S
    states = []
    for d_n, dS_n in zip(d.unbind(1), dS.unbind(1)):
        states.append(S)
        S = torch.addcmul(dS_n, d_n, S)
    return torch.stack(states, 1), S


def _prepare(q, k, v, scale, g, initial_state, chunk_size, extra=()):
    """Pad to whole chunks and cut: q `(B, H, Gq, N, K)` -> `(B, H, NC, Gq, C, K)` (scaled), k, v, g,
    extra `(B, H, N, ...)` -> `(B, H, NC, C, ...)` (g as its in-chunk cumulative sum Γ)."""
    B, H, Gq, N, K = q.shape
    V = v.shape[-1]
    C = min(chunk_size, -(-N // 4) * 4)  # short inputs: one chunk, padded to a multiple of 4
    pad = (-N) % C
    qc = _pad_time(q * scale, pad).reshape(B, H, Gq, -1, C, K).transpose(2, 3)
    k, v = _pad_time(k, pad), _pad_time(v, pad)
    G = None if g is None else chunk_log_decay(_pad_time(g, pad), C)
    extra = tuple(_to_chunks(_pad_time(x, pad), C) for x in extra)
    S = k.new_zeros(B, H, K, V) if initial_state is None else initial_state
    return (B, H, Gq, N, K, V, C), qc, _to_chunks(k, C), _to_chunks(v, C), G, S, extra


def _unchunk(o, B, H, Gq, C, N):
    """`(B, H, NC, Gq * C, V)` chunked outputs -> `(B, H, Gq, N, V)`."""
    NC, V = o.shape[2], o.shape[-1]
    return o.reshape(B, H, NC, Gq, C, V).transpose(2, 3).reshape(B, H, Gq, NC * C, V)[:, :, :, :N]


# Tokens per group of chunks in `chunk_decay_attention` (its per-group work is lighter than the delta
# engine's, so its groups are longer: fewer Python steps).
DECAY_GROUP_TOKENS = 1024


def _decay_group(qc, kc, vc, G, S):
    """One group of n chunks: qc `(BH, n, Gq, C, K)`, kc `(BH, n, C, K)`, vc `(BH, n, C, V)`, G None |
    `(BH, n, C)` | `(BH, n, C, K)`, S `(BH, K, V)`. Returns (o `(BH, n, Gq * C, V)`, S)."""
    BH, n, Gq, C, K = qc.shape
    Gb = None if G is None else G[:, :, None]                         # broadcast over the query heads
    if G is None or G.dim() == 3:
        A = gram_scalar(qc, kc[:, :, None], Gb)
    else:
        A = gram_vector(qc, kc[:, :, None], Gb)                       # (BH, n, Gq, C, C)
    qd, kd, d = _decay_factors(G, qc, kc)
    prev, S = _state_scan(S, d, kd.transpose(-1, -2) @ vc)            # states before each chunk
    o = A.reshape(BH, n, Gq * C, C) @ vc + qd.reshape(BH, n, Gq * C, K) @ prev
    return o, S


def chunk_decay_attention(q, k, v, scale: float, g=None, initial_state=None, chunk_size: int = 64):
    """Causal linear attention with optional decay. q `(B, H, Gq, N, K)` (Gq query heads per key
    head), k `(B, H, N, K)`, v `(B, H, N, V)`, g None | `(B, H, N)` (scalar log-decay) |
    `(B, H, N, K)` (per channel), initial_state `(B, H, K, V)` or None.
    Returns `(o (B, H, Gq, N, V), S_N (B, H, K, V))`. Chunks go in groups of about
    DECAY_GROUP_TOKENS tokens (small temporaries: at long N, big ones cost page faults and bandwidth)."""
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, _ = _prepare(q, k, v, scale, g, initial_state, chunk_size)
    NC = kc.shape[2]

    def flat(x):
        return None if x is None else x.reshape(B * H, NC, *x.shape[3:])

    qc, kc, vc, G = flat(qc), flat(kc), flat(vc), flat(G)
    S = S.reshape(B * H, K, V)
    n = max(1, DECAY_GROUP_TOKENS // C)
    groups = zip(*(x.split(n, 1) for x in (qc, kc, vc)), G.split(n, 1) if G is not None else [None] * NC)
    outs = []
    for qg, kg, vg, Gg in groups:
        o, S = _decay_group(qg, kg, vg, Gg, S)
        outs.append(o)
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return _unchunk(o.view(B, H, NC, Gq * C, V), B, H, Gq, C, N), S.reshape(B, H, K, V)


# Tokens per group of chunks in `chunk_delta`: every step of a group (grams, solve, state passing)
# works on about this many tokens of every head, so its operands stay in cache.
GROUP_TOKENS = 256


def _delta_group_prepare(qc, kc, vc, bc, G):
    """The state-independent part of one group of n chunks of every (batch, head) row (grams, UT
    transform), all flattened to M = BH * n matrices.

    qc `(BH, n, Gq, C, K)`, kc `(BH, n, C, K)`, vc `(BH, n, C, V)`, bc `(BH, n, C)`, G None |
    `(BH, n, C)` | `(BH, n, C, K)`. Returns `(W, U, A_qk, qd, kdT, d)`, each with the BH rows first."""
    BH, n, Gq, C, K = qc.shape
    V = vc.shape[-1]
    M = BH * n
    q, k, v, b = qc.reshape(M, Gq, C, K), kc.reshape(M, C, K), vc.reshape(M, C, V), bc.reshape(M, C)
    G = None if G is None else G.reshape(M, C, *G.shape[3:])
    kT = k.transpose(1, 2)
    if G is None:
        A_qk, A_kk = (q.reshape(M, Gq * C, K) @ kT).view(M, Gq, C, C).tril(), k @ kT
    elif G.dim() == 2:
        E = decay_matrix(G)
        A_qk, A_kk = (q.reshape(M, Gq * C, K) @ kT).view(M, Gq, C, C) * E[:, None], (k @ kT) * E
    else:
        A = gram_vector(torch.cat([k[None], q.transpose(0, 1)]), k, G)  # (1 + Gq, M, C, C)
        A_qk, A_kk = A[1:].transpose(0, 1), A[0]
    A_kk = A_kk.tril(-1) * b[:, :, None]
    qd, kd, d = _decay_factors(G, q, k)
    if G is None:
        kg = k * b[:, :, None]
    elif G.dim() == 2:
        kg = k * (torch.exp(G) * b)[:, :, None]
    else:
        kg = k * (torch.exp(G) * b[:, :, None])
    X = solve_unit_lower(A_kk, torch.cat([kg, v * b[:, :, None]], -1)).view(BH, n, C, K + V)
    W, U = X.split([K, V], -1)                                         # (BH, n, C, K), (BH, n, C, V)
    kdT = kd.view(BH, n, C, K).transpose(-1, -2)
    qd, A_qk = qd.reshape(BH, n, Gq * C, K), A_qk.reshape(BH, n, Gq * C, C)
    d = None if d is None else d.view(BH, n, *d.shape[1:])
    return W, U, A_qk, qd, kdT, d


def _delta_group_scan(prep, S):
    """The state passing through one prepared group: S `(BH, K, V)` before it -> (its n outputs
    `(BH, Gq * C, V)`, S after it)."""
    W, U, A_qk, qd, kdT, d = prep
    n = W.shape[1]
    outs = []
    per_chunk = zip(W.unbind(1), U.unbind(1), A_qk.unbind(1), qd.unbind(1), kdT.unbind(1),
                    d.unbind(1) if d is not None else [None] * n)
    for W_i, U_i, A_i, qd_i, kdT_i, d_i in per_chunk:
        v_new = torch.baddbmm(U_i, W_i, S, alpha=-1.0)                # Ṽ = U - W S
        outs.append(torch.baddbmm(A_i @ v_new, qd_i, S))              # O = A_qk Ṽ + (Q ⊙ e^Γ) S
        S = torch.baddbmm(S if d_i is None else S * d_i, kdT_i, v_new)
    return outs, S


def _delta_inputs(q, k, v, beta, scale, g, initial_state, chunk_size):
    """Padded, chunked inputs flattened to (batch x head) rows: (shape, S `(BH, K, V)`, an iterator over
    the groups' `(qc, kc, vc, bc, G)`)."""
    (B, H, Gq, N, K, V, C), qc, kc, vc, G, S, (bc,) = _prepare(
        q, k, v, scale, g, initial_state, chunk_size, extra=(beta,))
    NC = kc.shape[2]

    def flat(x):
        return None if x is None else x.reshape(B * H, NC, *x.shape[3:])

    qc, kc, vc, bc, G = flat(qc), flat(kc), flat(vc), flat(bc), flat(G)
    n = max(1, GROUP_TOKENS // C)
    # split (not slicing in the loop): the backward of one split is one concatenation, whereas each
    # slice's backward would materialize a zero tensor of the full length (quadratic in N).
    groups = zip(*(x.split(n, 1) for x in (qc, kc, vc, bc)), G.split(n, 1) if G is not None else [None] * NC)
    return (B, H, Gq, N, K, V, C, NC), S.reshape(B * H, K, V), groups


def delta_prepare(q, k, v, beta, scale: float, g=None, chunk_size: int = 64):
    """Phase 1 of `chunk_delta` (same arguments, no state): every group's state-independent tensors, for
    a state scan run later, e.g. in blocks of (batch, head) rows while the entering state arrives from
    another process (`anyattn.distributed`'s pipeline). Returns `(shape, groups)`; memory: the
    prepared tensors of the whole sequence (`chunk_delta` keeps one group's at a time)."""
    shape, _, groups = _delta_inputs(q, k, v, beta, scale, g, None, chunk_size)
    return shape, [_delta_group_prepare(*grp) for grp in groups]


def delta_scan(groups, S, rows: slice | None = None):
    """Phase 2 of `chunk_delta`: the state passing through prepared `groups` (from `delta_prepare`) for the
    flattened (batch, head) rows `rows` (None: all), from S `(rows, K, V)`. Returns (o `(rows, NC,
    Gq * C, V)`, S after the last token)."""
    outs = []
    for prep in groups:
        if rows is not None:
            prep = tuple(None if x is None else x[rows] for x in prep)
        o, S = _delta_group_scan(prep, S)
        outs += o
    return torch.stack(outs, 1), S


def delta_finish(shape, o):
    """Phase 3: the scanned outputs of every row `(B * H, NC, Gq * C, V)` -> `(B, H, Gq, N, V)`."""
    B, H, Gq, N, K, V, C, NC = shape
    return _unchunk(o.view(B, H, NC, Gq * C, V), B, H, Gq, C, N)


def chunk_delta(q, k, v, beta, scale: float, g=None, initial_state=None, chunk_size: int = 64):
    """Delta-rule family. q `(B, H, Gq, N, K)` (Gq query heads per key head), k `(B, H, N, K)`,
    v `(B, H, N, V)`, beta `(B, H, N)`, g None (DeltaNet) | `(B, H, N)` (Gated DeltaNet) |
    `(B, H, N, K)` (KDA). Returns `(o (B, H, Gq, N, V), S_N)`.

    Chunks are processed in groups of about GROUP_TOKENS tokens: per group, the decayed grams and the
    UT transform of all its chunks (batched matmuls), then the state passing through them."""
    shape, S, groups = _delta_inputs(q, k, v, beta, scale, g, initial_state, chunk_size)
    outs = []
    for grp in groups:
        o, S = _delta_group_scan(_delta_group_prepare(*grp), S)
        outs += o
    B, H, K, V = shape[0], shape[1], shape[4], shape[5]
    return delta_finish(shape, torch.stack(outs, 1)), S.reshape(B, H, K, V)
