"""ALiBi: linear distance penalties per head."""
from __future__ import annotations

import math

import torch

from ..validate import check_tensor
from .base import Bias, _causal_implied, pick, _check_param, _positions, _work

class Alibi(Bias):
    """ALiBi (Press et al. 2022, "Train Short, Test Long", arXiv:2108.12409): `bias[h, i, j] =
    -slopes[h] * |p_i - j|` with `p_i = i + N_k - N_q`.

    slopes: `(H,)` (or `(1,)`, shared) float tensor; gradients flow to it. `Alibi.geometric(H)` gives
    the paper's slopes `2^(-8 (h+1) / H)`. Under a causal mask the bias is exactly rank 2:
    `-s (p_i - j) = [s, -s (p_i - c)] . [j - c, 1]` (c = N_k // 2 centers the positions). Factors are
    built in float32 (or wider) and put in front of q so the GEMM adds the bias columns first; slopes
    that are not short in binary are split `s = s_hi + s_lo` (rank 4) so every product is exact.
    The symmetric (non-causal) form is not low rank and is computed per tile."""

    def __init__(self, slopes: torch.Tensor):
        check_tensor("Alibi slopes", slopes, 1)
        if not slopes.dtype.is_floating_point:
            raise TypeError(f"Alibi slopes must be a floating tensor, got {slopes.dtype}")
        self.slopes = slopes

    @staticmethod
    def geometric(H: int, device=None, dtype=torch.float32) -> "Alibi":
        """The ALiBi paper's slopes for H heads: `2^(-8 (h+1) / H)`, h = 0..H-1."""
        if isinstance(H, bool) or not isinstance(H, int) or H < 1:
            raise ValueError(f"H must be an int >= 1, got {H!r}")
        return Alibi(torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], device=device, dtype=dtype))

    def tensors(self):
        return (self.slopes,)

    def validate(self, B, H, n_q, n_k, device, dtype):
        if self.slopes.shape[0] not in (1, H):
            raise ValueError(f"Alibi slopes must have shape (H,) = ({H},), got {tuple(self.slopes.shape)}")
        _check_param("Alibi", "slopes", self.slopes, device)

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        s = tensors[0]
        w = _work(s.dtype)
        qp, kp = _positions(q0, q1, k0, k1, n_q, n_k, s.device, w)
        return -(s.to(w).view(1, -1, 1, 1) * (qp - kp).abs_())

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        s = tensors[0]
        w = _work(s.dtype)
        sh = s.to(w)[h if s.shape[0] > 1 else torch.zeros_like(h)]
        return -(sh * (q_idx + (n_k - n_q) - kv_idx).to(w).abs_())

    def bias_mod(self, n_q, n_k):
        s, off = self.slopes, n_k - n_q
        w = _work(s.dtype)
        return lambda b, h, q_idx, kv_idx: -(s[pick(h, s.shape[0])].to(w) * (q_idx + off - kv_idx).abs().to(w))

    def _split(self, n_k):
        """`(hi, lo)` with `hi` short enough that `hi * m` is exact in float32 for |m| <= n_k."""
        s = self.slopes.to(_work(self.slopes.dtype))
        bits = max(1, 24 - math.ceil(math.log2(n_k + 1)))
        mant, e = torch.frexp(s.detach())
        hi = torch.ldexp(torch.round(mant * 2.0 ** bits) / 2.0 ** bits, e)
        return hi, s - hi

    def factor_error(self, n_k: int) -> float:
        """Bound on the absolute score error the exact factors add in float32 (0 for short slopes)."""
        if n_k >= 1 << 24:
            return float("inf")
        if self.slopes.dtype == torch.float64:
            return 0.0
        _, lo = self._split(n_k)
        return float(lo.detach().abs().max()) * n_k * 2.0 ** -23

    def exact_rank(self, mask, n_q, n_k):
        if not _causal_implied(mask, n_q, n_k):
            return None
        _, lo = self._split(n_k)
        return 2 if bool((lo == 0).all()) else 4

    def exact_factors(self, mask, n_q, n_k):
        rank = self.exact_rank(mask, n_q, n_k)
        if rank is None:
            return None
        hi, lo = self._split(n_k)
        if rank == 2:  # hi == slopes exactly: use the slopes themselves so gradients reach them
            hi = self.slopes.to(hi.dtype)
        w = hi.dtype
        c = n_k // 2
        qp = torch.arange(n_k - n_q - c, n_k - c, device=hi.device, dtype=w)  # p_i - c
        kp = torch.arange(-c, n_k - c, device=hi.device, dtype=w)  # j - c
        H = hi.shape[0]
        parts = [(hi, qp)] if rank == 2 else [(hi, qp), (lo, qp)]
        us, vs = [], []
        for s, p in parts:
            us += [s.view(H, 1).expand(H, n_q), -s.view(H, 1) * p.view(1, -1)]
            vs += [kp, torch.ones_like(kp)]
        U = torch.stack(us, -1).unsqueeze(0)  # (1, H, n_q, R)
        V = torch.stack(vs, -1).view(1, 1, n_k, rank)
        return U, V

    def __repr__(self):
        return f"Alibi(H={self.slopes.shape[0]})"
