"""Projection compression of the KV cache (MatryoshkaKV: Lin et al., 2024, "MatryoshkaKV: Adaptive KV
Compression via Trainable Orthogonal Projection", ICLR 2025; PCA initialization as in their baseline
and in Eigen Attention / PALU).

Per layer and KV head h there are orthogonal bases `U_K[h]` `(D, D)` and `U_V[h]` `(D_v, D_v)` (columns
in descending variance) and means `mu_K[h]`, `mu_V[h]`. The cache stores

    k' = (k - mu_K) U_K[:, :r_k]        v' = (v - mu_V) U_V[:, :r_v]

queries are projected by the same `U_K[:, :r_k]` and the attention output is back-projected:

    o = softmax(scale * (q U_K) k'^T) v' U_V[:, :r_v]^T + mu_V.

At full rank this is exact: centering the keys shifts every score of a query row by the same
`scale * q . mu_K`, which softmax ignores (the LSE is corrected by adding it back), and the values'
weights sum to one so the mean comes back exactly.

API: `fit_pca(keys, values)` or the streaming `PCACalibrator` give a full-rank `PCAProjection`;
`.with_ranks(r_k, r_v)` truncates uniformly, `greedy_ranks(proj, budget)` / `.with_budget(...)` picks
per-head ranks for a memory budget; `finetune(proj, q, k, v)` optionally rotates the bases with a
Cayley parametrization to minimize a distillation loss against exact attention (MatryoshkaKV's
training objective, here on calibration tensors).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..validate import check_positive_int, check_tensor


@dataclass(frozen=True)
class PCAProjection:
    """Per-KV-head orthogonal bases and means. mu_k `(H_kv, D)`, basis_k `(H_kv, D, D)` (columns are
    principal directions, descending), var_k `(H_kv, D)` the variance along each column; the same for
    values with D_v. ranks_k / ranks_v: the number of columns kept per head."""

    mu_k: torch.Tensor
    basis_k: torch.Tensor
    var_k: torch.Tensor
    mu_v: torch.Tensor
    basis_v: torch.Tensor
    var_v: torch.Tensor
    ranks_k: tuple
    ranks_v: tuple

    @property
    def num_kv_heads(self) -> int:
        return self.basis_k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.basis_k.shape[-1]

    @property
    def v_head_dim(self) -> int:
        return self.basis_v.shape[-1]

    def with_ranks(self, rank_k, rank_v=None) -> "PCAProjection":
        """Keep `rank_k` key and `rank_v` (default: rank_k) value dims, each an int (all heads) or a
        sequence of H_kv ints."""
        rank_v = rank_k if rank_v is None else rank_v
        rk = _ranks("rank_k", rank_k, self.num_kv_heads, self.head_dim)
        rv = _ranks("rank_v", rank_v, self.num_kv_heads, self.v_head_dim)
        return replace(self, ranks_k=rk, ranks_v=rv)

    def with_budget(self, budget: float, multiple_of: int = 8) -> "PCAProjection":
        """Per-head ranks chosen greedily for `budget` (see `greedy_ranks`)."""
        rk, rv = greedy_ranks(self, budget, multiple_of)
        return replace(self, ranks_k=rk, ranks_v=rv)

    def dims_per_token(self) -> int:
        """Stored numbers per token (all KV heads, keys plus values)."""
        return sum(self.ranks_k) + sum(self.ranks_v)

    def compression(self) -> float:
        """Stored dims / full dims (keys and values, all heads)."""
        return self.dims_per_token() / (self.num_kv_heads * (self.head_dim + self.v_head_dim))

    def explained_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fraction of the calibration variance kept per head, for keys and for values `(H_kv,)` each."""
        def frac(var, ranks):
            keep = torch.stack([var[h, :r].sum() for h, r in enumerate(ranks)])
            return keep / var.sum(-1).clamp_min(torch.finfo(var.dtype).tiny)
        return frac(self.var_k, self.ranks_k), frac(self.var_v, self.ranks_v)

    def groups(self) -> list[tuple[list[int], int, int]]:
        """KV heads grouped by equal `(r_k, r_v)`: a list of `(heads, r_k, r_v)` (the cache stores each
        group in one buffer)."""
        out: dict[tuple[int, int], list[int]] = {}
        for h, (a, b) in enumerate(zip(self.ranks_k, self.ranks_v)):
            out.setdefault((a, b), []).append(h)
        return [(hs, a, b) for (a, b), hs in out.items()]

    def to(self, device=None, dtype=None) -> "PCAProjection":
        f = dict(device=device, dtype=dtype)
        return replace(self, mu_k=self.mu_k.to(**f), basis_k=self.basis_k.to(**f), var_k=self.var_k.to(**f),
                       mu_v=self.mu_v.to(**f), basis_v=self.basis_v.to(**f), var_v=self.var_v.to(**f))


def _ranks(name: str, r, H: int, D: int) -> tuple:
    if isinstance(r, int) and not isinstance(r, bool):
        r = [r] * H
    if not isinstance(r, (list, tuple)) or len(r) != H or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                 for x in r):
        raise ValueError(f"{name} must be an int or a sequence of H_kv = {H} ints, got {r!r}")
    for x in r:
        if not 1 <= x <= D:
            raise ValueError(f"{name} must lie in [1, {D}] (the head dim), got {list(r)}")
    return tuple(r)


class PCACalibrator:
    """Streaming calibration: `update(k, v)` with k `(B, H_kv, N, D)`, v `(B, H_kv, N, D_v)` (e.g. from
    a forward hook over calibration prompts), then `finish()` -> full-rank `PCAProjection` (float64
    statistics; cast with `.to(...)`)."""

    def __init__(self, num_kv_heads: int, head_dim: int, v_head_dim: int | None = None):
        self.H = check_positive_int("num_kv_heads", num_kv_heads)
        self.D = check_positive_int("head_dim", head_dim)
        self.Dv = check_positive_int("v_head_dim", head_dim if v_head_dim is None else v_head_dim)
        self.n = 0
        z = dict(dtype=torch.float64)
        self.sk, self.sv = torch.zeros(self.H, self.D, **z), torch.zeros(self.H, self.Dv, **z)
        self.skk, self.svv = torch.zeros(self.H, self.D, self.D, **z), torch.zeros(self.H, self.Dv, self.Dv, **z)

    def update(self, k: torch.Tensor, v: torch.Tensor) -> None:
        check_tensor("k", k, 4)
        check_tensor("v", v, 4)
        if k.shape[1] != self.H or k.shape[3] != self.D:
            raise ValueError(f"k must have shape (B, H_kv={self.H}, N, D={self.D}), got {tuple(k.shape)}")
        if v.shape[:3] != k.shape[:3] or v.shape[3] != self.Dv:
            raise ValueError(f"v must have shape (B, H_kv={self.H}, N={k.shape[2]}, D_v={self.Dv}) matching k, "
                             f"got {tuple(v.shape)}")
        kk = k.detach().double().transpose(0, 1).reshape(self.H, -1, self.D).cpu()  # host: float64 statistics
        vv = v.detach().double().transpose(0, 1).reshape(self.H, -1, self.Dv).cpu()  # host: float64 statistics
        self.n += kk.shape[1]
        self.sk += kk.sum(1)
        self.sv += vv.sum(1)
        self.skk += kk.transpose(1, 2) @ kk
        self.svv += vv.transpose(1, 2) @ vv

    def finish(self) -> PCAProjection:
        if self.n < 2:
            raise ValueError(f"PCACalibrator needs at least 2 sample tokens per head, got {self.n}")

        def eig(s, ss):
            mu = s / self.n
            cov = ss / self.n - mu[:, :, None] * mu[:, None, :]
            var, vec = torch.linalg.eigh(cov)
            return mu, vec.flip(-1), var.flip(-1).clamp_min(0)

        mk, bk, vk = eig(self.sk, self.skk)
        mv, bv, vv = eig(self.sv, self.svv)
        return PCAProjection(mk, bk, vk, mv, bv, vv, (self.D,) * self.H, (self.Dv,) * self.H)


def fit_pca(keys: torch.Tensor, values: torch.Tensor) -> PCAProjection:
    """Full-rank `PCAProjection` from sample keys `(B, H_kv, N, D)` and values `(B, H_kv, N, D_v)`
    (float64 statistics; move it with `.to(device, dtype)` or let `KVCache` do it)."""
    check_tensor("keys", keys, 4)
    check_tensor("values", values, 4)
    cal = PCACalibrator(keys.shape[1], keys.shape[3], values.shape[3])
    cal.update(keys, values)
    return cal.finish()


def greedy_ranks(projection: PCAProjection, budget: float, multiple_of: int = 8) -> tuple[tuple, tuple]:
    """Per-head key and value ranks for a cache budget, chosen greedily.

    budget: the fraction in (0, 1] of the full-rank cache (all heads, keys plus values) to keep.
    Every head starts with `min(multiple_of, D)` key and value dims; then, while the budget allows,
    the next `multiple_of` dims go to the (head, keys|values) whose next dims carry the largest
    fraction of that head's variance (eigenvalues normalized by the head's total, so heads and keys /
    values of different scale compete fairly). Eigenvalues are descending, so the greedy choice is
    optimal for this separable objective. Ranks in multiples of `multiple_of` keep the number of
    distinct ranks (cache buffers) small. Returns `(ranks_k, ranks_v)`.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
        raise ValueError(f"budget must be a fraction in (0, 1] of the full-rank cache, got {budget!r}")
    check_positive_int("multiple_of", multiple_of)
    H, D, Dv = projection.num_kv_heads, projection.head_dim, projection.v_head_dim
    total = int(round(budget * H * (D + Dv)))
    rk = [min(multiple_of, D)] * H
    rv = [min(multiple_of, Dv)] * H
    used = sum(rk) + sum(rv)
    if used > total:
        raise ValueError(f"budget={budget} allows {total} dims per token but the minimum (multiple_of="
                         f"{multiple_of} key and value dims per head) needs {used}")
    nk = projection.var_k.double() / projection.var_k.double().sum(-1, keepdim=True).clamp_min(1e-300)
    nv = projection.var_v.double() / projection.var_v.double().sum(-1, keepdim=True).clamp_min(1e-300)
    while True:
        best, best_gain = None, -1.0
        for h in range(H):
            for kind, ranks, norm, full in (("k", rk, nk, D), ("v", rv, nv, Dv)):
                r = ranks[h]
                step = min(multiple_of, full - r)
                if step <= 0 or used + step > total:
                    continue
                gain = float(norm[h, r:r + step].sum())
                if gain > best_gain:
                    best, best_gain = (kind, h, step), gain
        if best is None:
            break
        kind, h, step = best
        (rk if kind == "k" else rv)[h] += step
        used += step
    return tuple(rk), tuple(rv)


def _truncated(basis: torch.Tensor, ranks: Sequence[int]) -> torch.Tensor:
    """basis `(H, D, D)` with columns beyond each head's rank zeroed (a uniform-shape truncation)."""
    D = basis.shape[-1]
    keep = torch.arange(D, device=basis.device)[None, :] < torch.tensor(list(ranks), device=basis.device)[:, None]
    return basis * keep[:, None, :].to(basis.dtype)


def compressed_attention(q, k, v, projection: PCAProjection, *, mask=None, scale=None, bases=None):
    """Attention through the projection, on full tensors (the function the compressed cache computes;
    differentiable). q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`; `bases` optionally
    overrides `(basis_k, basis_v)`. Returns `(B, H, N_q, D_v)`."""
    from ..api import attention

    H, H_kv = q.shape[1], k.shape[1]
    G = H // H_kv
    bk, bv = bases if bases is not None else (projection.basis_k, projection.basis_v)
    f = dict(device=q.device, dtype=q.dtype)
    Uk, Uv = _truncated(bk.to(**f), projection.ranks_k), _truncated(bv.to(**f), projection.ranks_v)
    mk, mv = projection.mu_k.to(**f), projection.mu_v.to(**f)
    kc = (k - mk[None, :, None]) @ Uk[None]
    vc = (v - mv[None, :, None]) @ Uv[None]
    Ukq = Uk.repeat_interleave(G, 0)
    qc = q @ Ukq[None]
    out = attention(qc, kc, vc, mask=mask, scale=q.shape[-1] ** -0.5 if scale is None else scale)
    return out @ Uv.repeat_interleave(G, 0).transpose(1, 2)[None] + mv.repeat_interleave(G, 0)[None, :, None]


def _cayley(w: torch.Tensor) -> torch.Tensor:
    """Orthogonal `(I + S)(I - S)^{-1}` of the skew-symmetric `S = w - w^T`; identity at w = 0."""
    s = w - w.transpose(-1, -2)
    eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device).expand_as(w)
    return torch.linalg.solve(eye - s, eye + s, left=False)


def finetune(projection: PCAProjection, q, k, v, *, steps: int = 50, lr: float = 1e-2, mask=None, scale=None,
             ) -> tuple[PCAProjection, list[float]]:
    """Rotate the bases to minimize a distillation loss (MatryoshkaKV's training, on calibration tensors).

    `U = U_0 C(W)` with the Cayley map `C(W) = (I + S)(I - S)^{-1}`, `S = W - W^T`, so U stays
    orthogonal; W starts at 0 (the PCA bases). Loss: `||o_compressed - o_exact||^2 / ||o_exact||^2`
    over the calibration q `(B, H, N_q, D)`, k, v (the same layouts as `anyattn.attention`, with `mask`
    and `scale` as there). Ranks and means stay fixed. Adam for `steps` steps at `lr`.
    Returns `(new projection, losses)` with the loss before each step.
    """
    from ..api import attention

    check_positive_int("steps", steps)
    dt = torch.promote_types(q.dtype, torch.float32)
    q, k, v = (x.detach().to(dt) for x in (q, k, v))
    with torch.no_grad():
        target = attention(q, k, v, mask=mask, scale=scale)
    den = target.pow(2).mean().clamp_min(1e-30)
    bk0, bv0 = projection.basis_k.to(q.device, dt), projection.basis_v.to(q.device, dt)
    wk = torch.zeros_like(bk0, requires_grad=True)
    wv = torch.zeros_like(bv0, requires_grad=True)
    opt = torch.optim.Adam([wk, wv], lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = compressed_attention(q, k, v, projection, mask=mask, scale=scale,
                                   bases=(bk0 @ _cayley(wk), bv0 @ _cayley(wv)))
        loss = (out - target).pow(2).mean() / den
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        bk = (bk0 @ _cayley(wk)).to(projection.basis_k.dtype).to(projection.basis_k.device)
        bv = (bv0 @ _cayley(wv)).to(projection.basis_v.dtype).to(projection.basis_v.device)
    return replace(projection, basis_k=bk, basis_v=bv), losses
