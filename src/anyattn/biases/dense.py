"""An explicit bias tensor."""
from __future__ import annotations

import torch

from ..validate import check_broadcast, check_tensor
from .base import Bias, _gather4, pick

class Dense(Bias):
    """An explicit bias tensor broadcastable to `(B, H, N_q, N_k)` (1 to 4 dims, right-aligned).
    Gradients flow to it when it requires grad."""

    def __init__(self, bias: torch.Tensor):
        check_tensor("bias", bias)
        if not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.dim() > 4 or bias.dim() == 0:
            raise ValueError(f"bias must have 1 to 4 dims broadcastable to (B, H, N_q, N_k), got shape {tuple(bias.shape)}")
        self.bias = bias

    def _4d(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))

    def tensors(self):
        return (self.bias,)

    def validate(self, B, H, n_q, n_k, device, dtype):
        check_broadcast("bias", tuple(self._4d(self.bias).shape), (B, H, n_q, n_k), "(B, H, N_q, N_k)")
        if self.bias.device != device:
            raise ValueError(f"bias must be on the inputs' device {device}, got {self.bias.device}")
        if torch.isnan(self.bias).any():
            raise ValueError("bias contains NaN")

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        t = self._4d(tensors[0])
        qs = slice(q0, q1) if t.shape[2] > 1 else slice(None)
        ks = slice(k0, k1) if t.shape[3] > 1 else slice(None)
        return t[:, :, qs, ks]

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        return _gather4(self._4d(tensors[0]), b, h, q_idx, kv_idx)

    def bias_mod(self, n_q, n_k):
        t = self._4d(self.bias)
        B, H, Q, K = t.shape
        return lambda b, h, q_idx, kv_idx: t[pick(b, B), pick(h, H), pick(q_idx, Q), pick(kv_idx, K)]

    def __repr__(self):
        return f"Dense(shape={tuple(self.bias.shape)})"
