"""The `Bias` base class, sums of biases, `as_bias`, and the helpers every bias kind shares."""
from __future__ import annotations

from typing import Sequence

import torch


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_param(owner: str, name: str, t, device, allow_nan=False):
    """Floating tensor on `device` without NaN."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"{owner} {name} must be a floating tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{owner} {name} must be on the inputs' device {device}, got {t.device}")
    if not allow_nan and torch.isnan(t).any():
        raise ValueError(f"{owner} {name} contains NaN")


def _positions(q0, q1, k0, k1, n_q, n_k, device, dtype):
    """Aligned query positions `(Tq, 1)` and key positions `(1, Tk)` as `dtype` (exact integers)."""
    qp = torch.arange(q0 + n_k - n_q, q1 + n_k - n_q, device=device, dtype=dtype).view(-1, 1)
    kp = torch.arange(k0, k1, device=device, dtype=dtype).view(1, -1)
    return qp, kp


def _gather4(t: torch.Tensor, b, h, q, k) -> torch.Tensor:
    """`t[b, h, q, k]` of a 4-d tensor with broadcast index tensors; size-1 dims of t are not indexed."""
    z = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=t.device)
    return t[b if t.shape[0] > 1 else z, h if t.shape[1] > 1 else z, q if t.shape[2] > 1 else z,
             k if t.shape[3] > 1 else z]


def _causal_implied(mask, n_q: int, n_k: int) -> bool:
    """True when every (i, j) the mask allows has `j <= p_i` (the bottom-right causal half)."""
    from .. import masks as M
    if mask is None:
        return False
    if isinstance(mask, M.Causal):
        return mask.align == "bottom_right" or n_k >= n_q
    if isinstance(mask, M.SlidingWindow):
        return mask.right == 0 and (mask.align == "bottom_right" or n_k >= n_q)
    if isinstance(mask, M.And):
        return _causal_implied(mask.a, n_q, n_k) or _causal_implied(mask.b, n_q, n_k)
    if isinstance(mask, M.Or):
        return _causal_implied(mask.a, n_q, n_k) and _causal_implied(mask.b, n_q, n_k)
    return False


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

    def at(self, tensors: Sequence[torch.Tensor], b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor,
           kv_idx: torch.Tensor, n_q: int, n_k: int) -> torch.Tensor:
        """The bias at broadcast index tensors, like `Mask.allowed`: b `(B', 1, 1, 1)`, h `(1, H', 1, 1)`,
        q_idx `(1, 1, Tq, 1)`, kv_idx `(1, 1, 1, Tk)` (raw indices of the `n_q x n_k` problem, any order or
        stride) -> a tensor broadcastable to `(B', H', Tq, Tk)`, differentiable in `tensors` (explicit, so
        a backward that rebuilds tiles from detached copies gets gradients). Used for blocks whose
        positions are not contiguous (a strided shard). This default evaluates `tile` on the indices'
        bounding box and gathers; the specs override it with their formula."""
        qi, ki = q_idx.reshape(-1), kv_idx.reshape(-1)
        q0, k0 = int(qi.min()), int(ki.min())
        t = self.tile(tensors, q0, int(qi.max()) + 1, k0, int(ki.max()) + 1, n_q, n_k)
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        return _gather4(t, b, h, q_idx - q0, kv_idx - k0)

    def bias_mod(self, n_q: int, n_k: int):
        """The bias as a FlexAttention-style callable `(b, h, q_idx, kv_idx) -> float tensor` on raw
        (not aligned) integer indices, scalars or broadcast tensors, closing over `tensors()` (so
        gradients reach them); the values equal `dense(n_q, n_k)[b, h, q_idx, kv_idx]`."""
        raise NotImplementedError(f"{type(self).__name__} has no bias_mod form")

    def exact_rank(self, mask, n_q: int, n_k: int) -> int | None:
        """Rank of the exact factorization valid on the keys `mask` allows, or None (cheap, no compute)."""
        return None

    def exact_factors(self, mask, n_q: int, n_k: int):
        """`(U, V)` with U `(B|1, H|1, n_q, R)`, V `(B|1, H|1, n_k, R)` (float32 or wider) such that
        `U V^T` equals the bias on every allowed entry; differentiable in `tensors()`. None if none exists."""
        return None

    def terms(self) -> list["Bias"]:
        """The summands of this bias (itself unless it is a `Sum`)."""
        return [self]

    def __add__(self, other: "Bias") -> "Bias":
        return Sum(self, as_bias(other))

    def __radd__(self, other):
        if other == 0:
            return self
        return Sum(as_bias(other), self)


class Sum(Bias):
    """`a + b`: tensors are the concatenation of both parts' tensors; an exact low-rank form exists when
    both parts have one (factors concatenate)."""

    def __init__(self, a: Bias, b: Bias):
        if not isinstance(a, Bias) or not isinstance(b, Bias):
            raise TypeError(f"biases add only to biases, got {type(a).__name__} + {type(b).__name__}")
        self.a, self.b = a, b
        self._na = len(a.tensors())

    def tensors(self):
        return tuple(self.a.tensors()) + tuple(self.b.tensors())

    def validate(self, *args):
        self.a.validate(*args)
        self.b.validate(*args)

    def tile(self, tensors, *args):
        return self.a.tile(tensors[:self._na], *args) + self.b.tile(tensors[self._na:], *args)

    def terms(self):
        return self.a.terms() + self.b.terms()

    def at(self, tensors, *args):
        return self.a.at(tensors[:self._na], *args) + self.b.at(tensors[self._na:], *args)

    def bias_mod(self, n_q, n_k):
        fa, fb = self.a.bias_mod(n_q, n_k), self.b.bias_mod(n_q, n_k)
        return lambda b, h, q_idx, kv_idx: fa(b, h, q_idx, kv_idx) + fb(b, h, q_idx, kv_idx)

    def exact_rank(self, mask, n_q, n_k):
        ra, rb = self.a.exact_rank(mask, n_q, n_k), self.b.exact_rank(mask, n_q, n_k)
        return None if ra is None or rb is None else ra + rb

    def exact_factors(self, mask, n_q, n_k):
        fa, fb = self.a.exact_factors(mask, n_q, n_k), self.b.exact_factors(mask, n_q, n_k)
        if fa is None or fb is None:
            return None
        return concat_factors([fa, fb])

    def __repr__(self):
        return f"({self.a!r} + {self.b!r})"


def concat_factors(factors):
    """Concatenate `[(U1, V1), (U2, V2), ...]` along the rank dim, broadcasting their (B, H) dims."""
    dtype = factors[0][0].dtype
    for u, v in factors:
        dtype = torch.promote_types(dtype, torch.promote_types(u.dtype, v.dtype))
    lead_u = torch.broadcast_shapes(*[u.shape[:2] for u, _ in factors])
    lead_v = torch.broadcast_shapes(*[v.shape[:2] for _, v in factors])
    us = [u.to(dtype).expand(*lead_u, *u.shape[2:]) for u, _ in factors]
    vs = [v.to(dtype).expand(*lead_v, *v.shape[2:]) for _, v in factors]
    return torch.cat(us, -1), torch.cat(vs, -1)


def pick(index, size: int):
    """`index` where a tensor dim of `size` is indexed, 0 where the dim broadcasts (size 1)."""
    return index if size > 1 else 0


def as_bias(bias) -> Bias | None:
    """Normalize the `bias=` argument: None, a spec, a float tensor (Dense) or a `bias_mod` callable."""
    from .bias_mod import BiasMod
    from .dense import Dense
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, torch.Tensor):
        return Dense(bias)
    if callable(bias):
        return BiasMod(bias)
    raise TypeError(f"bias must be None, an anyattn.biases spec, a float tensor or a bias_mod callable, "
                    f"got {type(bias).__name__}")
