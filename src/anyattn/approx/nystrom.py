"""`nystrom` and `soft`: Nyström approximations of the attention matrix through m landmarks.

`nystrom` — Nyströmformer (Xiong et al., 2021, "Nyströmformer: A Nyström-Based Algorithm for
Approximating Self-Attention", AAAI). Landmarks `q~, k~ (m, D)` are segment means of q and k (m
contiguous segments of near-equal length); with `s = scale`,

    out = softmax(s q k~^T) pinv(softmax(s q~ k~^T)) softmax(s q~ k^T) v

and the pseudo-inverse is Nyströmformer's iteration (`Z0 = A^T / (|A|_1 |A|_inf)`,
`Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`, `pinv_iterations` steps) or `pinv="exact"`
(`torch.linalg.pinv`). With `num_landmarks >= N` the landmarks are the rows themselves and the result
is exact attention (up to the pseudo-inverse's accuracy).

`soft` — SOFT (Lu et al., 2021, "SOFT: Softmax-free Transformer with Linear Complexity", NeurIPS):
a Gaussian kernel `kappa(x, y) = exp(-s |x - y|^2 / 2)` with the landmarks shared by both sides (SOFT
ties Q = K; here the landmarks are segment means of k, so the core `kappa(k~, k~)` is symmetric
positive semi-definite) and the Newton–Schulz pseudo-inverse (`V0 = alpha A`,
`V <- 2 V - V A V`, `newton_iterations` steps, `alpha = 1 / |A|_1^2`). Since
`exp(s q.k) = kappa(q, k) exp(s |q|^2 / 2) exp(s |k|^2 / 2)` and the query factor cancels in the row
normalization, `soft` weights key j by `exp(s |k_j|^2 / 2)` and normalizes rows, so it estimates
softmax attention itself:

    out_i = sum_j K^_ij w_j v_j / sum_j K^_ij w_j,   K^ = kappa(q, k~) pinv(kappa(k~, k~)) kappa(k~, k)

With `num_landmarks >= N_k` it is exact (up to the inverse's convergence).

Both are non-causal and take no mask or bias (refused), and return no LSE (refused when asked).
Shapes: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(B, H, N_q, D_v)`.
"""
from __future__ import annotations

import torch

from ..registry import Method, Request, register
from ._common import check_choice, expand_kv, finish, positive_int, screen

DEFAULT_LANDMARKS = 64
DEFAULT_PINV_ITERS = 6
DEFAULT_NEWTON_ITERS = 20


def segment_means(x: torch.Tensor, m: int) -> torch.Tensor:
    """Means of m contiguous segments of near-equal length along dim -2: `(..., N, D) -> (..., m, D)`
    (segment i covers rows `[floor(i N / m), floor((i + 1) N / m))`). Requires m <= N."""
    N = x.shape[-2]
    bounds = (torch.arange(m + 1, device=x.device) * N) // m
    cs = torch.cat([torch.zeros_like(x[..., :1, :]), torch.cumsum(x, dim=-2)], dim=-2)
    sums = cs[..., bounds[1:], :] - cs[..., bounds[:-1], :]
    return sums / (bounds[1:] - bounds[:-1]).to(x.dtype).unsqueeze(-1)


def landmarks(x: torch.Tensor, m: int) -> torch.Tensor:
    """m landmarks of x; x itself when m >= N."""
    return x if m >= x.shape[-2] else segment_means(x, m)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Nyströmformer's pseudo-inverse iteration for `a (..., m_q, m_k)` (rectangular allowed)."""
    eye = torch.eye(a.shape[-2], dtype=a.dtype, device=a.device)
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    norminf = a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / (norm1 * norminf)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def newton_schulz_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """SOFT's Newton–Schulz iteration `V <- 2V - V A V` from `V0 = A / |A|_1^2` (a symmetric PSD)."""
    norm1 = a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    z = a / (norm1 * norm1)
    for _ in range(iterations):
        z = 2 * z - z @ a @ z
    return z


def _pinv(a, pinv: str, iterations: int, newton: bool = False):
    if pinv == "exact":
        return torch.linalg.pinv(a, hermitian=newton)
    return newton_schulz_pinv(a, iterations) if newton else iterative_pinv(a, iterations)


def nystrom_attention(q, k, v, scale: float, num_landmarks: int = DEFAULT_LANDMARKS, pinv: str = "iterative",
                      pinv_iterations: int = DEFAULT_PINV_ITERS):
    """Nyströmformer on expanded heads. Returns out `(B, H, N_q, D_v)`."""
    ql, kl = landmarks(q, num_landmarks), landmarks(k, num_landmarks)
    f = torch.softmax(scale * q @ kl.transpose(-1, -2), -1)
    a = torch.softmax(scale * ql @ kl.transpose(-1, -2), -1)
    b = torch.softmax(scale * ql @ k.transpose(-1, -2), -1)
    return f @ (_pinv(a, pinv, pinv_iterations) @ (b @ v))


def soft_attention(q, k, v, scale: float, num_landmarks: int = DEFAULT_LANDMARKS, pinv: str = "newton",
                   newton_iterations: int = DEFAULT_NEWTON_ITERS):
    """SOFT Gaussian-kernel Nyström on expanded heads, key-norm weighted to estimate softmax attention."""
    kl = landmarks(k, num_landmarks)
    s = scale
    # left factor kappa(q_i, k~_l), shifted per query row (cancels in the row normalization)
    d2 = (q * q).sum(-1, keepdim=True) - 2 * q @ kl.transpose(-1, -2) + (kl * kl).sum(-1).unsqueeze(-2)
    left_log = -0.5 * s * d2
    left = torch.exp(left_log - left_log.detach().amax(-1, keepdim=True))
    dc = (kl * kl).sum(-1, keepdim=True) - 2 * kl @ kl.transpose(-1, -2) + (kl * kl).sum(-1).unsqueeze(-2)
    core = torch.exp(-0.5 * s * dc.clamp_min(0))
    # right factor kappa(k~_l, k_j) exp(s |k_j|^2 / 2) = exp(s k~_l.k_j - s |k~_l|^2 / 2), shifted per head
    right_log = s * kl @ k.transpose(-1, -2) - 0.5 * s * (kl * kl).sum(-1, keepdim=True)
    right = torch.exp(right_log - right_log.detach().amax((-2, -1), keepdim=True))
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    num = left @ (_pinv(core, "exact" if pinv == "exact" else "newton", newton_iterations, newton=True) @ (right @ vv))
    den = num[..., -1:]
    ok = den.abs() > torch.finfo(den.dtype).tiny
    return torch.where(ok, num[..., :-1] / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num[..., :-1]))


def _supports(name):
    def supports(req: Request):
        reason = screen(req, name)
        if reason is None and req.return_lse:
            reason = f"{name} computes no LSE (return_lse=True was asked); use 'hyper' or 'performer'"
        return reason
    return supports


def _run_nystrom(req: Request, num_landmarks: int = DEFAULT_LANDMARKS, pinv: str = "iterative",
                 pinv_iterations: int = DEFAULT_PINV_ITERS, seed=None):
    positive_int("num_landmarks", num_landmarks)
    positive_int("pinv_iterations", pinv_iterations)
    check_choice("pinv", pinv, ("iterative", "exact"))
    q, k, v = expand_kv(req)
    return finish(nystrom_attention(q, k, v, req.scale, num_landmarks, pinv, pinv_iterations), None, req)


def _run_soft(req: Request, num_landmarks: int = DEFAULT_LANDMARKS, pinv: str = "newton",
              newton_iterations: int = DEFAULT_NEWTON_ITERS, seed=None):
    positive_int("num_landmarks", num_landmarks)
    positive_int("newton_iterations", newton_iterations)
    check_choice("pinv", pinv, ("newton", "exact"))
    q, k, v = expand_kv(req)
    return finish(soft_attention(q, k, v, req.scale, num_landmarks, pinv, newton_iterations), None, req)


_SEED = "accepted for uniformity; landmarks are deterministic segment means (no randomness)"

register(Method("nystrom", False, "Nyströmformer (Xiong et al. 2021): segment-mean landmarks, iterative "
                "pseudo-inverse; non-causal, no mask, no LSE", _supports("nystrom"), _run_nystrom,
                {"num_landmarks": f"landmarks m (default {DEFAULT_LANDMARKS}); >= N gives exact attention",
                 "pinv": "'iterative' (default, Nyströmformer's iteration) or 'exact' (torch.linalg.pinv)",
                 "pinv_iterations": f"iterations of the pseudo-inverse (default {DEFAULT_PINV_ITERS})",
                 "seed": _SEED}))
register(Method("soft", False, "SOFT (Lu et al. 2021): Gaussian-kernel Nyström with shared landmarks and "
                "Newton–Schulz inverse, key-norm weighted to estimate softmax; non-causal, no mask, no LSE",
                _supports("soft"), _run_soft,
                {"num_landmarks": f"landmarks m, segment means of k (default {DEFAULT_LANDMARKS}); >= N_k "
                                  "gives exact attention",
                 "pinv": "'newton' (default, Newton–Schulz) or 'exact' (torch.linalg.pinv)",
                 "newton_iterations": f"Newton–Schulz steps (default {DEFAULT_NEWTON_ITERS})",
                 "seed": _SEED}))
