"""Kernelized supervised hashing (Liu et al., 2012, "Supervised Hashing with Kernels"), as EcoFormer (Liu et
al., 2022) fits its attention hash functions: `fit_ksh` -> an `EcoformerFeatures` feature map for
`anyattn.linear.linear_attention`.

Per head, on sample vectors x (queries or keys of a batch), normalized to x̂ = x / |x|:
- supervision: S[i, j] = +1 for the `topk` most similar samples of i (largest x̂_i . x̂_j), -1 for the
  `topk` least similar, 0 elsewhere;
- kernel features: κ̃(x) = exp(-|x̂ - a_l|^2 / (2 sigma2)) - mean, to m anchors a_l drawn from the samples,
  sigma2 the mean squared sample-anchor distance;
- bits fitted greedily: for bit r, with the residual R = b S - sum_{r' < r} h_{r'} h_{r'}^T, maximize
  `h^T R h` over h = sign(κ̃ a_r): start from the spectral relaxation (the top generalized eigenvector of
  `(κ̃^T R κ̃, κ̃^T κ̃)`), refine by gradient descent (Nesterov momentum) on the relaxation
  `2 sigmoid(κ̃ a) - 1`, and keep the better of the two under the true (sign) objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validate import check_positive_int, check_tensor
from .feature_maps import EcoformerFeatures


def _similarity_labels(xn: torch.Tensor, topk: int) -> torch.Tensor:
    """S `(B, H, N, N)`: +1 on each row's topk largest inner products, -1 on its topk smallest."""
    sim = xn @ xn.transpose(-1, -2)
    S = torch.zeros_like(sim)
    S.scatter_(-1, sim.topk(topk, -1).indices, 1.0)
    S.scatter_(-1, sim.topk(topk, -1, largest=False).indices, -1.0)
    return S


def _objective(y: torch.Tensor, R: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Per head `-mean_b (y^T R y) / (N b)`: y `(B, H, N)`, R `(B, H, N, N)` -> `(H,)`."""
    N = y.shape[-1]
    return -(torch.einsum("bhn,bhnl,bhl->bh", y, R, y) / (N * num_bits)).mean(0)


def _spectral_start(kern: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Per head the top generalized eigenvector a of `(κ̃^T R κ̃, κ̃^T κ̃)` (summed over the batch), scaled so
    that `|κ̃ a|^2 = N`: kern `(B, H, N, m)`, R `(B, H, N, N)` -> `(H, m)`."""
    m, N = kern.shape[-1], kern.shape[2]
    left = torch.einsum("bhnm,bhnl,bhlk->hmk", kern, R, kern)
    right = torch.einsum("bhnm,bhnk->hmk", kern, kern)
    right = right + 1e-6 * right.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * torch.eye(m, dtype=kern.dtype, device=kern.device)
    chol = torch.linalg.cholesky(right)
    C = torch.linalg.solve_triangular(chol, torch.linalg.solve_triangular(chol, left, upper=False).transpose(-1, -2),
                                      upper=False)
    u = torch.linalg.eigh((C + C.transpose(-1, -2)) / 2).eigenvectors[..., -1]
    a = torch.linalg.solve_triangular(chol.transpose(-1, -2), u[..., None], upper=True)[..., 0]
    norm = torch.einsum("hm,hmk,hk->h", a, right, a) / kern.shape[0]
    return a * torch.sqrt(N / norm)[:, None]


def fit_ksh(x: torch.Tensor, num_bits: int, num_anchors: int, *, topk: int = 10, iterations: int = 100,
            lr: float = 0.5, momentum: float = 0.9, seed: int = 0, official_bias: bool = False) -> EcoformerFeatures:
    """Fit EcoFormer's hash functions on samples x `(B, H, N, D)` (e.g. the keys of a batch; one set of
    hash functions per head). num_bits: b; num_anchors: m (<= N); topk: similar / dissimilar samples per
    row of the supervision; iterations, lr, momentum: the gradient refinement of each bit; seed: the
    anchors. Quadratic in N (the supervision is N x N): fit on a sample. Returns an `EcoformerFeatures` (feature dim b + 1) for `linear_attention(..., feature_map=...)`."""
    check_tensor("x", x, 4)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    check_positive_int("num_bits", num_bits)
    check_positive_int("num_anchors", num_anchors)
    check_positive_int("topk", topk)
    check_positive_int("iterations", iterations, 0)
    B, H, N, D = x.shape
    if num_anchors > N:
        raise ValueError(f"num_anchors must be <= the number of samples N = {N}, got {num_anchors}")
    if 2 * topk > N:
        raise ValueError(f"topk must be <= N / 2 = {N // 2} (topk similar and topk dissimilar per sample), got {topk}")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        xn = F.normalize(x.detach().to(dt), dim=-1)
        idx = torch.randperm(N, generator=gen)[:num_anchors].to(x.device)  # host: seeded CPU generator, moved
        anchors = xn[0, :, idx]                                                # (H, m, D)
        d2 = (xn[..., :, None, :] - anchors[:, None]).square().sum(-1)         # (B, H, N, m)
        sigma2 = d2.mean((0, 2, 3))
        kern = torch.exp(-d2 / (2 * sigma2[:, None, None]))
        centers = kern.mean((0, 2))                                            # (H, m)
        kern = kern - centers[:, None]
        R = _similarity_labels(xn, topk) * num_bits
        weights = kern.new_zeros(H, num_bits, num_anchors)
    for r in range(num_bits):
        with torch.no_grad():
            start = _spectral_start(kern, R)
        a, buf = start.clone(), torch.zeros_like(start)
        for _ in range(iterations):                                       # SGD, Nesterov momentum
            with torch.enable_grad():                                     # also when called under no_grad
                a.requires_grad_(True)
                y = 2 * torch.sigmoid(torch.einsum("bhnm,hm->bhn", kern, a)) - 1
                (grad,) = torch.autograd.grad(_objective(y, R, num_bits).sum(), a)
            with torch.no_grad():
                buf = momentum * buf + grad
                a = a.detach() - lr * (grad + momentum * buf)
        with torch.no_grad():
            codes = [torch.where(torch.einsum("bhnm,hm->bhn", kern, w) > 0, 1.0, -1.0).to(dt) for w in (start, a)]
            better = _objective(codes[1], R, num_bits) < _objective(codes[0], R, num_bits)   # per head
            weights[:, r] = torch.where(better[:, None], a.detach(), start)
            y = torch.where(better[None, :, None], codes[1], codes[0])
            R = R - y[..., :, None] * y[..., None, :]
    return EcoformerFeatures(anchors.to(x.dtype), weights.to(x.dtype), centers.to(x.dtype), sigma2.to(x.dtype),
                             official_bias=official_bias)
