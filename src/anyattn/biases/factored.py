"""A low-rank bias `u v^T`."""
from __future__ import annotations

import torch

from ..validate import check_broadcast, check_tensor
from .base import Bias, _check_param, _work, pick

class Factored(Bias):
    """A low-rank bias `u v^T`: u `(..., N_q, R)`, v `(..., N_k, R)` with 2 to 4 dims whose leading dims
    broadcast to `(B, H)`. Gradients flow to u and v. `lowrank()` returns one (with `rel_error` and
    `rank` set) from a truncated SVD."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor, *, rel_error: float | None = None):
        for name, t in (("u", u), ("v", v)):
            check_tensor(f"Factored {name}", t)
            if t.dim() not in (2, 3, 4):
                raise ValueError(f"Factored {name} must have 2 to 4 dims (..., N, R), got shape {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"Factored {name} must be a floating tensor, got {t.dtype}")
        if u.shape[-1] != v.shape[-1]:
            raise ValueError(f"Factored u and v must have the same rank (last dim), got {u.shape[-1]} and {v.shape[-1]}")
        self.u, self.v, self.rel_error = u, v, rel_error

    @property
    def rank(self) -> int:
        return self.u.shape[-1]

    @staticmethod
    def _4d(t):
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def tensors(self):
        return (self.u, self.v)

    def validate(self, B, H, n_q, n_k, device, dtype):
        for name, t, n in (("u", self.u, n_q), ("v", self.v, n_k)):
            t4 = self._4d(t)
            check_broadcast(f"Factored {name}", tuple(t4.shape), (B, H, n, t.shape[-1]),
                            f"(B, H, N_{'q' if name == 'u' else 'k'}, R)")
            _check_param("Factored", name, t, device)

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        u, v = self._4d(tensors[0]), self._4d(tensors[1])
        w = _work(torch.promote_types(u.dtype, v.dtype))
        return torch.matmul(u[:, :, q0:q1].to(w), v[:, :, k0:k1].to(w).transpose(-1, -2))

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        def take(t, idx):
            t = self._4d(t)
            t = t[b.reshape(-1)] if t.shape[0] > 1 else t
            t = t[:, h.reshape(-1)] if t.shape[1] > 1 else t
            return t[:, :, idx.reshape(-1)]
        u, v = take(tensors[0], q_idx), take(tensors[1], kv_idx)
        w = _work(torch.promote_types(u.dtype, v.dtype))
        return torch.matmul(u.to(w), v.to(w).transpose(-1, -2))

    def bias_mod(self, n_q, n_k):
        u, v = self._4d(self.u), self._4d(self.v)
        w = _work(torch.promote_types(u.dtype, v.dtype))

        def mod(b, h, q_idx, kv_idx):
            bu, hu, bv, hv = pick(b, u.shape[0]), pick(h, u.shape[1]), pick(b, v.shape[0]), pick(h, v.shape[1])
            # A sum of R scalar products (FlexAttention evaluates score mods per element).
            return sum(u[bu, hu, q_idx, r].to(w) * v[bv, hv, kv_idx, r].to(w) for r in range(self.rank))
        return mod

    def exact_rank(self, mask, n_q, n_k):
        return self.rank

    def exact_factors(self, mask, n_q, n_k):
        u, v = self._4d(self.u), self._4d(self.v)
        w = _work(torch.promote_types(u.dtype, v.dtype))
        return u.to(w), v.to(w)

    def __repr__(self):
        err = "" if self.rel_error is None else f", rel_error={self.rel_error:.3g}"
        return f"Factored(rank={self.rank}{err})"
