"""FlexAttention-style `bias_mod` callables."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..validate import check_broadcast, check_tensor
from .base import Bias, _work

class BiasMod(Bias):
    """A FlexAttention-style `bias_mod(b, h, q_idx, kv_idx, *params) -> float tensor`, evaluated per tile
    on broadcast index tensors (b `(B, 1, 1, 1)`, h `(1, H, 1, 1)`, q_idx `(1, 1, Tq, 1)`, kv_idx
    `(1, 1, 1, Tk)`; raw indices, not aligned). Learnable tensors must be passed as `params` (they are
    handed back as the trailing arguments) so that engines can return their gradients; a callable that
    closes over tensors requiring grad is rejected at validation."""

    def __init__(self, fn: Callable, params: Sequence[torch.Tensor] = ()):
        if not callable(fn):
            raise TypeError(f"bias_mod must be callable, got {type(fn).__name__}")
        params = tuple(params)
        for i, p in enumerate(params):
            check_tensor(f"BiasMod params[{i}]", p)
        self.fn, self.params = fn, params
        self._bh = None

    def tensors(self):
        return self.params

    def validate(self, B, H, n_q, n_k, device, dtype):
        for i, p in enumerate(self.params):
            if p.device != device:
                raise ValueError(f"BiasMod params[{i}] must be on the inputs' device {device}, got {p.device}")
        self._bh = (torch.arange(B, device=device).view(-1, 1, 1, 1), torch.arange(H, device=device).view(1, -1, 1, 1))
        zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
        probe = self._call([p.detach() for p in self.params], *self._bh, zero, zero)
        check_broadcast("bias_mod output", tuple(probe.shape), (B, H, 1, 1), "(B, H, N_q, N_k)")
        if probe.requires_grad:
            raise ValueError("bias_mod output requires grad although its params were detached: it closes over "
                             "tensors that require grad; pass them as BiasMod(fn, params=(...)) to get their gradients")
        if torch.isnan(probe).any():
            raise ValueError("bias_mod returned NaN")

    def _call(self, params, b, h, q_idx, kv_idx):
        out = self.fn(b, h, q_idx, kv_idx, *params)
        if isinstance(out, (int, float)) and not isinstance(out, bool):
            out = torch.tensor(float(out), device=q_idx.device)
        if not isinstance(out, torch.Tensor) or not out.dtype.is_floating_point:
            raise TypeError(f"bias_mod must return a float tensor, got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out.reshape((1,) * (4 - out.dim()) + tuple(out.shape)) if out.dim() < 4 else out

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        dev = tensors[0].device if tensors else (self._bh[0].device if self._bh else None)
        q_idx = torch.arange(q0, q1, device=dev).view(1, 1, -1, 1)
        kv_idx = torch.arange(k0, k1, device=dev).view(1, 1, 1, -1)
        b, h = self._bh if self._bh is not None else (torch.zeros((1, 1, 1, 1), dtype=torch.long, device=dev),) * 2
        out = self._call(tensors, b, h, q_idx, kv_idx)
        out = out.to(_work(out.dtype))
        return out.expand(*out.shape[:2], q1 - q0, k1 - k0)

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        out = self._call(tensors, b, h, q_idx, kv_idx)
        return out.to(_work(out.dtype))

    def bias_mod(self, n_q, n_k):
        def mod(b, h, q_idx, kv_idx):
            out = self.fn(b, h, q_idx, kv_idx, *self.params)
            return out if isinstance(out, torch.Tensor) else torch.full((), float(out), device=q_idx.device)
        return mod

    def __repr__(self):
        return f"BiasMod({getattr(self.fn, '__name__', 'fn')})"
