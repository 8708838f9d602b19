"""Additive bias specifications (DESIGN.md "Masks and biases are specifications, not tensors").

A bias spec adds `bias[b, h, i, j]` to the scaled scores `q_i . k_j * scale`. Engines ask it for

- `tensors()`: the tensors it depends on (parameters whose gradients engines must return);
- `tile(tensors, q0, q1, k0, k1, n_q, n_k)`: the bias on a tile, broadcastable to `(B, H, Tq, Tk)`,
  computed from the given tensors (so a backward pass can recompute it with autograd and get
  gradients for every learnable part);
- `dense(n_q, n_k)`: the whole bias (quadratic; for references and SDPA).

Positions are bottom-right aligned like causal masks: query `i` sits at key position
`i + n_k - n_q`. Biases add: `bias_a + bias_b`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .validate import check_broadcast, check_tensor


class Bias:
    """Base class of bias specifications."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return ()

    def validate(self, B: int, H: int, n_q: int, n_k: int, device: torch.device, dtype: torch.dtype) -> None:
        """Raise ValueError/TypeError if the spec cannot apply to this problem."""

    def tile(self, tensors: Sequence[torch.Tensor], q0: int, q1: int, k0: int, k1: int,
             n_q: int, n_k: int) -> torch.Tensor:
        raise NotImplementedError

    def dense(self, n_q: int, n_k: int) -> torch.Tensor:
        return self.tile(self.tensors(), 0, n_q, 0, n_k, n_q, n_k)

    def __add__(self, other: "Bias") -> "Bias":
        return Sum(self, as_bias(other))


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

    def __repr__(self):
        return f"Dense(shape={tuple(self.bias.shape)})"


class Sum(Bias):
    """`a + b`: tensors are the concatenation of both parts' tensors."""

    def __init__(self, a: Bias, b: Bias):
        self.a, self.b = a, b
        self._na = len(a.tensors())

    def tensors(self):
        return tuple(self.a.tensors()) + tuple(self.b.tensors())

    def validate(self, *args):
        self.a.validate(*args)
        self.b.validate(*args)

    def tile(self, tensors, *args):
        return self.a.tile(tensors[:self._na], *args) + self.b.tile(tensors[self._na:], *args)

    def __repr__(self):
        return f"({self.a!r} + {self.b!r})"


def as_bias(bias) -> Bias | None:
    """Normalize the `bias=` argument: None, a spec, or a float tensor (Dense)."""
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, torch.Tensor):
        return Dense(bias)
    raise TypeError(f"bias must be None, an anyattn.biases spec or a float tensor, got {type(bias).__name__}")
