"""Shared math of the chunk engines (`chunk_decay`, `chunk_delta`): cutting the sequence into chunks,
in-chunk cumulative decays, decayed grams and their backward, the unit-triangular solve and inverse, and the
matmul precision.

Decayed gram, per chunk:  `A[r, c] = sum_d a[r, d] b[c, d] exp(Γ[r, d] - Γ[c, d])` (c <= r), Γ the in-chunk
cumulative log-decay (scalar per position, or per key channel). Its gradient in Γ needs no pass of its
own: for `M(a, b, Γ)`, `dΓ = a ⊙ da - b ⊙ db` (row and column factor gradients), so the engines'
backward passes collect `dΓ` from the gradients of the decayed factors and reverse-cumsum it (in-chunk)
into `dg`. `prepare`, `unchunk`, `decay_factors`, `gram_scalar` and `solve_unit_lower` serve the autograd
path (the previous engines, kept as the gradient oracle).

Numerical care for per-channel decay: exp is only ever taken of non-positive numbers. `gram_vector` is
hierarchical: the chunk is split into 4 sub-blocks; a pair of sub-blocks (i > j) uses the reference
Γ_end(j) (last position of block j): `(a_r e^{Γ_r - Γ_end(j)}) . (b_c e^{Γ_end(j) - Γ_c})`, both factors
<= 1; diagonal sub-blocks recurse, down to blocks of <= 4 tokens where `exp(Γ_r - Γ_c)` is formed per
element for c <= r only. So decays of any strength give no inf / NaN, forward or backward.

Precision: `md` is the dtype of the matmul operands (`matmul_dtype`: bf16 for bf16 / fp16 inputs on CPU);
the engines cast q, k, v to it group by group (`take`). Products come back in `md` and are accumulated in
the compute dtype (fp32, or fp64) of the gates and the state; exps, cumsums and states never leave it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lse import EXP_FLOOR
from ..precision import matmul_dtype  # noqa: F401  (the engines' policy, re-exported)


def mm(a: torch.Tensor, b: torch.Tensor, md: torch.dtype | None = None) -> torch.Tensor:
    """`a @ b` with operands in `md` (None: as given), returned in the wider of a's and b's dtypes
    (operands already in `md` give a result in `md`)."""
    if md is None or (a.dtype == md and b.dtype == md):
        return a @ b
    return (a.to(md) @ b.to(md)).to(torch.promote_types(a.dtype, b.dtype))


def _exp_masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """exp(x) where `keep`, exactly 0 elsewhere (x is never exponentiated where masked)."""
    return torch.exp(x.masked_fill(~keep, float("-inf")))


def tril_mask(L: int, device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(diagonal)


def pad_time(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad dim 2 (time) of `(B, H, N)` or `(B, H, N, D)` with zeros at the end."""
    if pad == 0:
        return x
    if x.dim() == 3:
        return F.pad(x, (0, pad))
    return F.pad(x, (0, 0, 0, pad))


def to_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    B, H, N = x.shape[:3]
    return x.reshape(B, H, N // C, C, *x.shape[3:])


def chunk_log_decay(g: torch.Tensor, C: int) -> torch.Tensor:
    """In-chunk cumulative log-decay Γ: `(B, H, N[, D])` -> `(B, H, N / C, C[, D])`."""
    return to_chunks(g, C).cumsum(3)


def chunk_size_for(N: int, chunk_size: int) -> int:
    """Chunk length: `chunk_size`, or for short inputs one chunk of N rounded up to a multiple of 4."""
    return min(chunk_size, -(-N // 4) * 4)


def decay_matrix(G: torch.Tensor) -> torch.Tensor:
    """`exp(G_r - G_c)` for c <= r, exactly 0 above: G `(..., L)` non-increasing -> `(..., L, L)`.

    The exponent is clamped to [EXP_FLOOR, 0] before exp (nothing positive is exponentiated, and no
    denormal results: both are slow paths of CPU exp; a factor below e^-80 is negligible next to the
    diagonal's 1), then the upper triangle is multiplied by 0."""
    L = G.shape[-1]
    e = torch.exp(torch.clamp(G[..., :, None] - G[..., None, :], EXP_FLOOR, 0.0))
    return e * tril_mask(L, G.device).to(e.dtype)


def gram_scalar(a, b, G, diagonal: int = 0, md=None):
    """`(a b^T) ⊙ exp(G_r - G_c)` on the lower triangle (c <= r + diagonal, diagonal 0 or -1), 0 above.
    a, b `(..., L, K)`, G `(..., L)` or None (no decay); md: matmul operand dtype (None: as given)."""
    L = a.shape[-2]
    s = mm(a, b.transpose(-1, -2), md)
    mask = tril_mask(L, a.device, diagonal)
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


def _gram_lags_backward(a, b, G, dM):
    """(da, db) of `_gram_lags` for the cotangent dM (only its lower triangle is read), in the full batch shape."""
    L = G.shape[-2]
    dd = dM.diagonal(dim1=-2, dim2=-1)[..., None]                        # (..., L, 1)
    da, db = dd * b, dd * a
    for lag in range(1, L):
        de = dM.diagonal(offset=-lag, dim1=-2, dim2=-1)[..., None] * torch.exp(G[..., lag:, :] - G[..., :-lag, :])
        da[..., lag:, :] += de * b[..., :-lag, :]
        db[..., :-lag, :] += de * a[..., lag:, :]
    return da, db


def gram_vector(a, b, G, md=None):
    """Decayed gram with per-channel decay: `M[r, c] = sum_d a[r,d] b[c,d] exp(G[r,d] - G[c,d])`
    for c <= r, 0 above. b, G `(..., L, K)`; a `(..., L, K)` or with extra leading dims that
    broadcast (e.g. q and k stacked). Never exponentiates a positive number (for G non-increasing).
    `md`: dtype of the sub-block matmul operands (None: as given).

    Hierarchical: split into nb = 4 sub-blocks; pair (i > j) uses the reference Γ_end(j):
    `(a_i e^{Γ_i - Γ_end(j)}) (b_j e^{Γ_end(j) - Γ_j})^T` (both factors <= 1) as one matmul;
    diagonal sub-blocks recurse; blocks of <= 4 rows (or odd length) go by lags."""
    L, K = G.shape[-2], G.shape[-1]
    if L <= 4 or L % 4 != 0:
        if L <= 4:
            return _gram_lags(a, b, G)
        mask = tril_mask(L, G.device)
        eb = _exp_masked(G[..., :, None, :] - G[..., None, :, :], mask[:, :, None]) * b[..., None, :, :]
        return (eb @ a[..., :, :, None]).squeeze(-1)                  # (..., L_r, L_c)
    nb = 4
    s = L // nb
    a_ = a.reshape(*a.shape[:-2], nb, s, K)
    b_ = b.reshape(*b.shape[:-2], nb, s, K)
    G_ = G.reshape(*G.shape[:-2], nb, s, K)
    g_end = G_[..., :, s - 1:, :]                                     # (..., nb, 1, K)
    diag = gram_vector(a_, b_, G_, md)                                # (..., nb, s, s)
    batch = torch.broadcast_shapes(diag.shape[:-3], G.shape[:-2])
    M = diag.new_zeros(*batch, nb, s, nb, s)
    for j in range(nb - 1):
        ref = g_end[..., j:j + 1, :, :]
        kt = b_[..., j:j + 1, :, :] * torch.exp(ref - G_[..., j:j + 1, :, :])        # (..., 1, s, K)
        qs = a_[..., j + 1:, :, :] * torch.exp(G_[..., j + 1:, :, :] - ref)          # (..., nb-j-1, s, K)
        M[..., j + 1:, :, j, :] = mm(qs, kt.transpose(-1, -2), md)                    # (..., nb-j-1, s, s)
    for i in range(nb):
        M[..., i, :, i, :] = diag[..., i, :, :]
    return M.reshape(*batch, L, L)


def _sum_to(x: torch.Tensor, shape) -> torch.Tensor:
    """Sum the leading dims of x that `shape` broadcasts over (the adjoint of broadcasting)."""
    extra = x.dim() - len(shape)
    if extra > 0:
        x = x.sum(tuple(range(extra)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(dims, keepdim=True) if dims else x


def gram_vector_backward(a, b, G, dM, md=None):
    """(da, db) of `gram_vector(a, b, G)` for the cotangent dM `(..., L, L)` (its upper triangle is
    ignored); da has a's shape, db has b's (summed over what b broadcast over). The same hierarchy as
    the forward, so again only exps of non-positive numbers. The Γ gradient is `a ⊙ da - b ⊙ db`."""
    da, db = _gram_vector_backward(a, b, G, dM, md)
    return _sum_to(da, a.shape), _sum_to(db, b.shape)


def _gram_vector_backward(a, b, G, dM, md):
    """`gram_vector_backward` with both gradients in the full broadcast batch shape of dM."""
    L, K = G.shape[-2], G.shape[-1]
    batch = dM.shape[:-2]
    if L <= 4:
        da, db = _gram_lags_backward(a, b, G, dM)
    elif L % 4 != 0:
        mask = tril_mask(L, G.device)
        e = _exp_masked(G[..., :, None, :] - G[..., None, :, :], mask[:, :, None])      # (..., L_r, L_c, K)
        dMe = dM[..., None] * e
        da = (dMe * b[..., None, :, :]).sum(-2)
        db = (dMe * a[..., :, None, :]).sum(-3)
    else:
        nb = 4
        s = L // nb
        a_ = a.reshape(*a.shape[:-2], nb, s, K)
        b_ = b.reshape(*b.shape[:-2], nb, s, K)
        G_ = G.reshape(*G.shape[:-2], nb, s, K)
        dM_ = dM.reshape(*batch, nb, s, nb, s)
        dd = torch.stack([dM_[..., i, :, i, :] for i in range(nb)], -3)              # (..., nb, s, s)
        da_, db_ = _gram_vector_backward(a_, b_, G_, dd, md)
        da_, db_ = da_.expand(*batch, nb, s, K).clone(), db_.expand(*batch, nb, s, K).clone()
        g_end = G_[..., :, s - 1:, :]
        for j in range(nb - 1):
            ref = g_end[..., j:j + 1, :, :]
            ek = torch.exp(ref - G_[..., j:j + 1, :, :])                               # (..., 1, s, K)
            eq = torch.exp(G_[..., j + 1:, :, :] - ref)                                # (..., nb-j-1, s, K)
            dMj = dM_[..., j + 1:, :, j, :]                                            # (..., nb-j-1, s, s)
            da_[..., j + 1:, :, :] += mm(dMj, b_[..., j:j + 1, :, :] * ek, md) * eq
            db_[..., j, :, :] += (mm(dMj.transpose(-1, -2), a_[..., j + 1:, :, :] * eq, md) * ek).sum(-3)
        da, db = da_.reshape(*batch, L, K), db_.reshape(*batch, L, K)
    return da.expand(*batch, L, K), db.expand(*batch, L, K)


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
    P = _neumann_inverse(diag)
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


def _neumann_inverse(A: torch.Tensor) -> torch.Tensor:
    """`(I + A)^{-1}` of strictly lower `(..., b, b)` blocks: `prod_k (I + (-A)^(2^k))` (exact, A nilpotent)."""
    b = A.shape[-1]
    N = -A
    P, Np = N + torch.eye(b, dtype=A.dtype, device=A.device), N
    for _ in range(max(0, (b - 1).bit_length() - 1)):
        Np = Np @ Np
        P = P + P @ Np
    return P


def unit_lower_inverse(A: torch.Tensor, block: int = 16) -> torch.Tensor:
    """`T = (I + A)^{-1}` for strictly lower-triangular A `(M, C, C)`, matmuls only: the diagonal
    `block x block` blocks by the Neumann product, then doubling `[[T1, 0], [A21, T2]]^{-1} =
    [[T1, 0], [-T2 A21 T1, T2]]` up to C (padded with identity rows to block * 2^k). Explicit T makes
    the solve and its transpose (the backward) one matmul each."""
    M, C, _ = A.shape
    if C <= block:
        return _neumann_inverse(A)
    Cp = block << max(0, (-(-C // block) - 1).bit_length())
    if Cp != C:
        A = F.pad(A, (0, Cp - C, 0, Cp - C))
    s = block
    T = _neumann_inverse(A.reshape(M, Cp // s, s, Cp // s, s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2))
    while s < Cp:                                                     # T: (M, Cp / s, s, s) diagonal blocks
        p = Cp // (2 * s)
        A21 = A.reshape(M, p, 2 * s, p, 2 * s).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)[..., s:, :s]
        T1, T2 = T[:, 0::2], T[:, 1::2]
        T = torch.cat([torch.cat([T1, torch.zeros_like(T1)], -1), torch.cat([-(T2 @ (A21 @ T1)), T2], -1)], -2)
        s *= 2
    T = T[:, 0]
    return T[:, :C, :C] if Cp != C else T


def decay_factors(G, qc, kc):
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


def decays(G):
    """(e^Γ, e^{Γ_C - Γ}, e^{Γ_C}) shaped to multiply `(M, C, K)` rows and the state `(M, K or 1, 1)`
    (G `(M, C)` scalar or `(M, C, K)` per channel); all None without decay."""
    if G is None:
        return None, None, None
    if G.dim() == 2:
        return torch.exp(G)[..., None], torch.exp(G[:, -1:] - G)[..., None], torch.exp(G[:, -1:])[..., None]
    return torch.exp(G), torch.exp(G[:, -1:, :] - G), torch.exp(G[:, -1:, :]).transpose(1, 2)


def scaled(x, f, dtype):
    """x ⊙ f (f None: x) in `dtype` (one pass)."""
    if f is None:
        return x.to(dtype)
    return torch.mul(x, f, out=torch.empty(torch.broadcast_shapes(x.shape, f.shape), dtype=dtype, device=x.device))


def prepare(q, k, v, scale, g, initial_state, chunk_size, extra=()):
    """Pad to whole chunks and cut: q `(B, H, Gq, N, K)` -> `(B, H, NC, Gq, C, K)` (scaled), k, v, g,
    extra `(B, H, N, ...)` -> `(B, H, NC, C, ...)` (g as its in-chunk cumulative sum Γ)."""
    B, H, Gq, N, K = q.shape
    V = v.shape[-1]
    C = chunk_size_for(N, chunk_size)
    pad = (-N) % C
    qc = pad_time(q * scale, pad).reshape(B, H, Gq, -1, C, K).transpose(2, 3)
    k, v = pad_time(k, pad), pad_time(v, pad)
    G = None if g is None else chunk_log_decay(pad_time(g, pad), C)
    extra = tuple(to_chunks(pad_time(x, pad), C) for x in extra)
    S = k.new_zeros(B, H, K, V) if initial_state is None else initial_state
    return (B, H, Gq, N, K, V, C), qc, to_chunks(k, C), to_chunks(v, C), G, S, extra


def chunks(x: torch.Tensor, C: int, time_dim: int = 2) -> torch.Tensor:
    """Chunk-major view `(NC, B * H, ..., C, ...)` of `(B, H, ..., N, ...)` (time at `time_dim`), zero-padded to
    whole chunks (a copy only when N % C != 0): the chunks of a group are then one slice `[i0:i1]` and the
    engines copy each group's operands once, while they are hot (`take`). Outputs allocated with NC * C
    positions are written through the same view."""
    pad = (-x.shape[time_dim]) % C
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 1 - time_dim) + [0, pad])
    B, H = x.shape[:2]
    return x.reshape(B * H, *x.shape[2:time_dim], -1, C, *x.shape[time_dim + 1:]).movedim(time_dim - 1, 0)


def forward_groups(step, out, C: int, n: int, S, save: bool):
    """The engines' forward loop over groups of n chunks: `step(sl, S) -> (o, S, saved)` for each group slice
    `sl` of the chunk axis, its output `(n, B * H, Gq * C, V)` written into `out` `(B, H, Gq, NC * C, V)`.
    Returns (the state after the last group, the groups' saved tensors if `save`)."""
    B, H, Gq, L, V = out.shape
    oc = chunks(out, C, time_dim=3)                                                # (NC, BH, Gq, C, V)
    saved = []
    for i0 in range(0, L // C, n):
        sl = slice(i0, i0 + n)
        o, S, sv = step(sl, S)
        oc[sl] = o.view(-1, B * H, Gq, C, V)
        if save:
            saved.append(sv)
    return S, saved


def take(x: torch.Tensor, dtype: torch.dtype | None = None, scale: float | None = None) -> torch.Tensor:
    """A contiguous copy of a group slice of `chunks(...)` (in `dtype`, times `scale`)."""
    out = torch.empty(x.shape, dtype=dtype or x.dtype, device=x.device)
    return out.copy_(x) if scale is None else torch.mul(x, scale, out=out)


def unchunk(o, B, H, Gq, C, N):
    """`(B, H, NC, Gq * C, V)` chunked outputs -> `(B, H, Gq, N, V)`."""
    NC, V = o.shape[2], o.shape[-1]
    return o.reshape(B, H, NC, Gq, C, V).transpose(2, 3).reshape(B, H, Gq, NC * C, V)[:, :, :, :N]
