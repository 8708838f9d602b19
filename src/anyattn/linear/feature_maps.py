"""Feature maps for linear attention: `phi(q) . phi(k)` replaces `exp(q . k)`.

Every built-in map is an object with `map_qk(q, k, offset) -> (phi_q, phi_k)`, so that maps that
need both sides at once (one random projection shared by q and k; positions for cosFormer) see
them together. A plain user callable `f(x) -> phi(x)` is applied to q and k separately.
Inputs are `(B, H, N, D)`; outputs `(B, H, N, F)` where F is the feature dimension.

- ``elu1``: `elu(x) + 1` (Katharopoulos et al., 2020, "Transformers are RNNs").
- ``relu``: `relu(x)`.
- ``performer``: positive orthogonal random features, FAVOR+ (Choromanski et al., 2021,
  "Rethinking Attention with Performers"): `phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`, so that
  `E[phi(q) . phi(k)] = exp(q . k)`. `PerformerFeatures` first multiplies inputs by `D ** -0.25`
  (so the estimate is of `exp(q . k / sqrt(D))`, the softmax kernel) unless `normalize_input=False`.
- ``cosformer``: `relu` with cos/sin re-weighting by position (Qin et al., 2022, "cosFormer"):
  `phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)]`, so
  `phi(q_i) . phi(k_j) = relu(q_i) . relu(k_j) cos(pi (i - j) / 2M)`; M = `max_len` (default: the
  length of the call, counting `offset`).
- ``nalaformer``: norm-aware map (Meng et al., 2025, "NaLaFormer"), as read in METHODS.md:
  keys are cubed elementwise and split `[relu(k^3), relu(-k^3)]`, then L2-normalized; queries are
  split `[relu(q), relu(-q)] / |q|` and raised elementwise to the per-query power
  `p = 3 (0.5 + tanh |q|)` (query norm controls the spikiness).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator | None = None, *,
                        dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """`(m, d)` random matrix whose rows are orthogonal within each block of d rows and whose row
    norms are distributed as the norms of d-dimensional standard Gaussian vectors (chi(d)), as in
    FAVOR+. Drawn on CPU from `generator` (seedable), then moved to `device`."""
    nblocks = -(-m // d)
    g = torch.randn(nblocks, d, d, generator=generator, dtype=torch.float64)  # host: seeded CPU draw
    qmat, r = torch.linalg.qr(g)
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # Haar-uniform (sign-fixed QR)
    w = qmat.transpose(-1, -2).reshape(nblocks * d, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1, keepdim=True)  # host: seeded
    return (w * norms).to(dtype=dtype, device=device)


def performer_features(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Positive random features `exp(x W^T - |x|^2 / 2) / sqrt(m)` for `x (..., d)` and
    `projection W (m, d)`; returns `(..., m)`. Computed in at least fp32. No input scaling and no
    stabilizer here: `features(q) . features(k)` is an unbiased estimate of `exp(q . k)`."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dt)
    w = projection.to(device=x.device, dtype=dt)
    m = w.shape[0]
    return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(m)


class PerformerFeatures:
    """FAVOR+ feature map with a fixed projection drawn from `seed`.

    num_features: m (default: D). redraw: draw a fresh projection on every call (training-time
    redrawing); `redraw()` draws one explicitly. The same projection is used for q and k within
    one call."""

    def __init__(self, dim: int, num_features: int | None = None, seed: int | None = 0,
                 redraw: bool = False, normalize_input: bool = True):
        self.dim = dim
        self.num_features = num_features or dim
        self.redraw_on_call = redraw
        self.normalize_input = normalize_input
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        self.projection = orthogonal_gaussian(self.num_features, dim, self.generator)

    def redraw(self) -> None:
        self.projection = orthogonal_gaussian(self.num_features, self.dim, self.generator)

    def _prep(self, x):
        return x * self.dim ** -0.25 if self.normalize_input else x

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return performer_features(self._prep(x), self.projection)

    def map_qk(self, q, k, offset: int = 0):
        if self.redraw_on_call:
            self.redraw()
        return self(q), self(k)


class _Elementwise:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)

    def map_qk(self, q, k, offset: int = 0):
        return self.fn(q), self.fn(k)


class CosformerFeatures:
    """cosFormer re-weighting; `max_len` is M in `cos(pi (i - j) / 2M)` (None: the call's length)."""

    def __init__(self, max_len: int | None = None):
        self.max_len = max_len

    def map_qk(self, q, k, offset: int = 0):
        n = q.shape[-2]
        M = self.max_len if self.max_len is not None else offset + n
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        pos = torch.arange(offset, offset + n, device=q.device, dtype=dt)
        ang = (math.pi / (2 * M)) * pos
        c, s = torch.cos(ang)[:, None], torch.sin(ang)[:, None]

        def phi(x):
            r = F.relu(x.to(dt))
            return torch.cat([r * c, r * s], -1)

        return phi(q), phi(k)


class NalaformerFeatures:
    """Norm-aware feature map (see module docstring); feature dim 2 D."""

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def map_qk(self, q, k, offset: int = 0):
        k3 = k ** 3
        fk = torch.cat([F.relu(k3), F.relu(-k3)], -1)
        fk = fk / (fk.norm(dim=-1, keepdim=True) + self.eps)
        qn = q.norm(dim=-1, keepdim=True)
        u = torch.cat([F.relu(q), F.relu(-q)], -1) / (qn + self.eps)
        p = 3.0 * (0.5 + torch.tanh(qn))
        fq = torch.where(u > 0, u.clamp_min(self.eps) ** p, torch.zeros_like(u))
        return fq, fk


def _elu1(x):
    return F.elu(x) + 1.0


FEATURE_MAPS = ("elu1", "relu", "performer", "cosformer", "nalaformer")


def resolve_feature_map(feature_map, dim: int, options: dict | None = None):
    """Turn a name, a built-in object or a user callable into an object with `map_qk`."""
    options = dict(options or {})
    if isinstance(feature_map, str):
        if feature_map == "elu1":
            return _Elementwise(_elu1)
        if feature_map == "relu":
            return _Elementwise(F.relu)
        if feature_map == "performer":
            return PerformerFeatures(dim, **options)
        if feature_map == "cosformer":
            return CosformerFeatures(**options)
        if feature_map == "nalaformer":
            return NalaformerFeatures(**options)
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)} or a callable, got {feature_map!r}")
    if hasattr(feature_map, "map_qk"):
        return feature_map
    if callable(feature_map):
        return _Elementwise(feature_map)
    if feature_map is None:
        return None
    raise TypeError(f"feature_map must be a str, a callable or None, got {type(feature_map).__name__}")


FeatureMap = Callable[[torch.Tensor], torch.Tensor]
