"""Truncated SVD of any bias (FlashBias for learned tables)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .base import as_bias
from .factored import Factored


class LowRank(NamedTuple):
    """Result of `lowrank`: `bias` a `Factored` (u `(B|1, H|1, N_q, R)`, v likewise with N_k), its
    `rank`, the relative Frobenius error it reached (`rel_error`, worst head) and whether it is `exact`."""

    bias: Factored
    rank: int
    rel_error: float
    exact: bool


SVD_EXACT_MAX = 1024  # full SVD up to this min(N_q, N_k); randomized range finder above


def _right_basis(B: torch.Tensor, tol: float | None, rank: int | None) -> torch.Tensor:
    """Orthonormal right basis `W (N_k, K)` of one matrix `B (N_q, N_k)`, ordered by decreasing singular
    value, with K at least the rank asked for (`rank`) or needed to reach `tol`."""
    n = min(B.shape)
    if n <= SVD_EXACT_MAX:
        return torch.linalg.svd(B, full_matrices=False)[2].transpose(0, 1)
    gen = torch.Generator(device=B.device).manual_seed(0)
    normsq = B.square().sum()
    target = rank if rank is not None else 32
    while True:
        k = min(n, target + 16)
        if k >= n // 2:
            return torch.linalg.svd(B, full_matrices=False)[2].transpose(0, 1)
        omega = torch.randn(B.shape[1], k, generator=gen, device=B.device, dtype=B.dtype)
        Q = torch.linalg.qr(B @ omega).Q
        for _ in range(2):  # power iterations sharpen the leading subspace
            Q = torch.linalg.qr(B @ torch.linalg.qr(B.T @ Q).Q).Q
        _, S, Vh = torch.linalg.svd(Q.T @ B, full_matrices=False)
        if rank is not None:
            return Vh.T
        # |B - B W_r W_r^T|_F^2 <= |B|_F^2 - sum_{i<=r} s_i^2 (the two-sided projection's error).
        resid = (normsq - torch.cumsum(S.square(), 0)).clamp_min(0)
        ok = (resid <= (tol ** 2) * normsq).nonzero()
        if len(ok) and int(ok[0]) + 1 <= k - 16:
            return Vh.T
        target *= 2


def lowrank(bias, n_q: int, n_k: int, *, rank: int | None = None, tol: float | None = None,
            mask=None) -> LowRank:
    """A low-rank form `U V^T` of `bias` on an `n_q x n_k` problem (FlashBias, arXiv:2505.12044).

    An exact factorization is returned when the spec has one under `mask` (causal ALiBi, SpatialDistance,
    Factored, sums of those) and neither `rank` nor `tol` is given. Else a truncated SVD of the dense bias
    `(B|1, H|1, n_q, n_k)` per (batch, head): `rank=` keeps that many singular directions, `tol=` the
    smallest rank whose relative Frobenius error `|B - U V^T|_F / |B|_F` is at most tol in every head
    (full SVD up to min(n_q, n_k) = 1024, a randomized range finder with power iterations above). The
    factors are `U = B W`, `V = W` with W the leading right singular vectors (the orthogonal projection
    of B), differentiable in the bias parameters: gradients flow through the projection with the
    subspace held fixed. `rel_error` is the measured error of the returned factors (worst head, float64).
    Costs one dense `n_q x n_k` bias per head: compute it once for fixed tables (inference)."""
    bias = as_bias(bias)
    if bias is None:
        raise ValueError("bias must be a bias spec or tensor, got None")
    for name, val in (("n_q", n_q), ("n_k", n_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if rank is not None and tol is not None:
        raise ValueError(f"give rank= or tol=, not both (got rank={rank}, tol={tol})")
    if rank is None and tol is None:
        f = bias.exact_factors(mask, n_q, n_k)
        if f is not None:
            return LowRank(Factored(*f, rel_error=0.0), f[0].shape[-1], 0.0, True)
        raise ValueError(f"bias {bias!r} has no exact low-rank form here; pass rank= or tol= for a truncated SVD")
    D = bias.dense(n_q, n_k)
    D = D.reshape((1,) * (4 - D.dim()) + tuple(D.shape))
    lead = D.shape[:2]
    mats = D.detach().reshape(-1, n_q, n_k)
    bases = []
    with torch.no_grad():
        needed = []
        for m in mats:
            md = m.double()
            W = _right_basis(md, tol, rank)
            if rank is not None:
                needed.append(min(rank, W.shape[1]))
            else:
                normsq = md.square().sum()
                captured = torch.cumsum((md @ W).square().sum(0), 0)  # |B W_r|_F^2, r = 1..K
                ok = (normsq - captured <= (tol ** 2) * normsq).nonzero()
                needed.append(int(ok[0]) + 1 if len(ok) else W.shape[1])
            bases.append(W)
        r = max(needed)
        for i, m in enumerate(mats):  # heads whose basis is narrower than the common rank
            if bases[i].shape[1] < r:
                bases[i] = _right_basis(m.double(), None, r)
        err = 0.0
        for m, W in zip(mats, bases):  # measured directly (a cumulative curve cancels below ~1e-8)
            md, Wd = m.double(), W[:, :r]
            nrm = md.norm()
            if nrm > 0:
                err = max(err, float((md - (md @ Wd) @ Wd.T).norm() / nrm))
        Wr = torch.stack([W[:, :r] for W in bases]).reshape(*lead, n_k, r).to(D.dtype)
    U = D @ Wr
    return LowRank(Factored(U, Wr, rel_error=err), r, err, False)
