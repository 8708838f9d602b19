"""Additive bias specifications (DESIGN.md "Masks and biases are specifications, not tensors").

A bias spec adds `bias[b, h, i, j]` to the scaled scores `q_i . k_j * scale`. Engines ask it for

- `tensors()`: the tensors it depends on (parameters whose gradients engines must return);
- `tile(tensors, q0, q1, k0, k1, n_q, n_k)`: the bias on a tile, a 4-d tensor broadcastable to
  `(B, H, Tq, Tk)`, computed from the given tensors (so a backward pass can recompute it with autograd
  and get gradients for every learnable part);
- `dense(n_q, n_k)`: the whole bias (quadratic; for references and SDPA);
- `exact_rank(mask, n_q, n_k)` / `exact_factors(mask, n_q, n_k)`: an exact low-rank form
  `bias = U V^T` where one exists (FlashBias, Wu et al. 2025, arXiv:2505.12044): causal ALiBi
  (rank 2, or 4 for slopes that need a hi/lo split), `SpatialDistance` in d dims (rank d + 2),
  `Factored` (its rank). `lowrank(bias, n_q, n_k, rank=, tol=)` gives a truncated SVD of any bias
  and reports the error it reached.

Positions are bottom-right aligned: query `i` of `n_q` sits at key position `p_i = i + n_k - n_q`
(as for causal masks). Biases add: `bias_a + bias_b`. Tiles are computed in at least float32.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from .validate import check_broadcast, check_tensor


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
    from . import masks as M
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
        stride) -> a tensor broadcastable to `(B', H', Tq, Tk)`, differentiable in `tensors`. Used for
        blocks whose positions are not contiguous (a strided shard). This default evaluates `tile` on the
        indices' bounding box and gathers; the specs override it with their formula."""
        qi, ki = q_idx.reshape(-1), kv_idx.reshape(-1)
        q0, k0 = int(qi.min()), int(ki.min())
        t = self.tile(tensors, q0, int(qi.max()) + 1, k0, int(ki.max()) + 1, n_q, n_k)
        t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
        return _gather4(t, b, h, q_idx - q0, kv_idx - k0)

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

    def __repr__(self):
        return f"Dense(shape={tuple(self.bias.shape)})"


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

    def at(self, tensors, *args):
        return self.a.at(tensors[:self._na], *args) + self.b.at(tensors[self._na:], *args)

    def terms(self):
        return self.a.terms() + self.b.terms()

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


def t5_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int,
              max_distance: int) -> torch.Tensor:
    """The T5 relative-position bucket (Raffel et al. 2020) of `relative_position = j - p_i` (key minus
    query): exact buckets for small distances, logarithmic ones up to `max_distance`; bidirectional
    uses half the buckets per direction, causal (unidirectional) maps keys after the query to bucket 0."""
    rel = relative_position.long()
    out = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        out += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = torch.clamp(rel, min=1).double()
    large = max_exact + (torch.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return out + torch.where(is_small, rel, large)


class RelativePosition(Bias):
    """A learned table of per-head biases indexed by the relative position of query and key.

    table: `(num_entries, H)` (or `(num_entries, 1)`), like T5's `relative_attention_bias.weight` and
        Swin's `relative_position_bias_table`; gradients flow to it.
    index: callable `(q_pos (Tq, 1), kv_pos (1, Tk)) -> long (Tq, Tk)` of table rows, on aligned
        positions (query i at `i + N_k - N_q`).
    Constructors: `RelativePosition.t5(table, bidirectional=True, max_distance=128)` (T5, Raffel et al.
    2020, arXiv:1910.10683) and `RelativePosition.swin(table, grid)` (Swin, Liu et al. 2021,
    arXiv:2103.14030: a `(2 Wh - 1) (2 Ww - 1)` table indexed by (dy, dx) on a `(Wh, Ww)` grid,
    tokens in row-major order). No exact low rank: `lowrank_bias` uses a truncated SVD (`tol=`/`rank=`).
    """

    def __init__(self, table: torch.Tensor, index: Callable, *, kind: str = "custom", info: dict | None = None):
        check_tensor("RelativePosition table", table, 2)
        if not table.dtype.is_floating_point:
            raise TypeError(f"RelativePosition table must be a floating tensor, got {table.dtype}")
        if not callable(index):
            raise TypeError(f"RelativePosition index must be callable, got {type(index).__name__}")
        self.table, self.index, self.kind, self.info = table, index, kind, dict(info or {})
        self._lut = None

    @staticmethod
    def t5(table: torch.Tensor, bidirectional: bool = True, max_distance: int = 128) -> "RelativePosition":
        """T5 buckets; `num_buckets = table.shape[0]`. Causal models use `bidirectional=False`."""
        check_tensor("RelativePosition table", table, 2)
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
        nb = table.shape[0]
        if nb < (4 if bidirectional else 2):
            raise ValueError(f"T5 table must have at least {4 if bidirectional else 2} buckets (rows), got {nb}")
        if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance <= nb // (4 if bidirectional else 2):
            raise ValueError(f"max_distance must be an int > num_buckets // {4 if bidirectional else 2} = "
                             f"{nb // (4 if bidirectional else 2)}, got {max_distance!r}")
        rp = RelativePosition(table, (lambda qp, kp: t5_bucket(kp - qp, bidirectional, nb, max_distance)),
                              kind="t5", info={"bidirectional": bidirectional, "max_distance": max_distance})
        return rp

    @staticmethod
    def swin(table: torch.Tensor, grid) -> "RelativePosition":
        """Swin 2-D table: `table ((2 Wh - 1) (2 Ww - 1), H)`, `grid = (Wh, Ww)`; token t is at
        `(t // Ww, t % Ww)`; the entry for query (y1, x1), key (y2, x2) is row
        `(y1 - y2 + Wh - 1) (2 Ww - 1) + (x1 - x2 + Ww - 1)`."""
        check_tensor("RelativePosition table", table, 2)
        if not (isinstance(grid, (tuple, list)) and len(grid) == 2
                and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
            raise ValueError(f"grid must be a pair of ints >= 1 (Wh, Ww), got {grid!r}")
        Wh, Ww = grid
        need = (2 * Wh - 1) * (2 * Ww - 1)
        if table.shape[0] != need:
            raise ValueError(f"Swin table for grid {tuple(grid)} must have (2*{Wh}-1)*(2*{Ww}-1) = {need} rows, "
                             f"got {table.shape[0]}")

        def index(qp, kp):
            qp, kp = qp.long(), kp.long()
            return (qp // Ww - kp // Ww + Wh - 1) * (2 * Ww - 1) + (qp % Ww - kp % Ww + Ww - 1)
        return RelativePosition(table, index, kind="swin", info={"grid": (Wh, Ww)})

    def tensors(self):
        return (self.table,)

    def validate(self, B, H, n_q, n_k, device, dtype):
        if self.table.shape[1] not in (1, H):
            raise ValueError(f"RelativePosition table must have shape (num_entries, H) with H = {H}, "
                             f"got {tuple(self.table.shape)}")
        _check_param("RelativePosition", "table", self.table, device)
        if self.kind == "swin":
            Wh, Ww = self.info["grid"]
            if n_k != Wh * Ww or n_q > n_k:
                raise ValueError(f"Swin grid {(Wh, Ww)} needs N_k = {Wh * Ww} keys and N_q <= N_k, "
                                 f"got N_q = {n_q}, N_k = {n_k}")

    def _index(self, q0, q1, k0, k1, n_q, n_k, device):
        if self.kind == "t5":
            # The bucket depends only on j - p_i: evaluate it once per distance.
            key = (n_q, n_k, device)
            if self._lut is None or self._lut[0] != key:
                rel = torch.arange(-(n_k - 1), n_q, device=device)
                self._lut = (key, self.index(torch.zeros(1, 1, dtype=torch.long, device=device), rel.view(1, -1))[0])
            qp, kp = _positions(q0, q1, k0, k1, n_q, n_k, device, torch.long)
            return self._lut[1][kp - qp + (n_k - 1)]
        qp, kp = _positions(q0, q1, k0, k1, n_q, n_k, device, torch.long)
        return self.index(qp, kp)

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        t = tensors[0]
        idx = self._index(q0, q1, k0, k1, n_q, n_k, t.device)
        return t.to(_work(t.dtype)).t()[:, idx].unsqueeze(0)  # (1, H, Tq, Tk)

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        t = tensors[0]
        idx = self.index(q_idx.reshape(-1, 1) + (n_k - n_q), kv_idx.reshape(1, -1))
        return t.to(_work(t.dtype))[idx.unsqueeze(0).unsqueeze(0), h if t.shape[1] > 1 else torch.zeros_like(h)]

    def __repr__(self):
        return f"RelativePosition.{self.kind}(table={tuple(self.table.shape)})"


class SpatialDistance(Bias):
    """Squared-distance bias for point clouds, meshes and PDE grids: `bias[b, h, i, j] =
    -weight[h] * |x_i - y_j|^2`.

    coords: `(N, d)` or `(B, N, d)` positions; key_coords: the keys' positions (same forms), default
    `coords`. With `key_coords=None`, coords has N_k rows and query i uses row `i + N_k - N_q`; else
    coords has N_q rows. weight: `(H,)` or `(1,)`. Gradients flow to coords, key_coords and weight.
    Exact rank d + 2 (FlashBias): `-w|x - y|^2 = [2 w x, -w |x|^2, -w] . [y, 1, |y|^2]`, with both
    point sets shifted by the keys' mean to limit cancellation."""

    def __init__(self, coords: torch.Tensor, weight: torch.Tensor, key_coords: torch.Tensor | None = None):
        for name, t in (("coords", coords), ("key_coords", key_coords)):
            if t is None:
                continue
            check_tensor(f"SpatialDistance {name}", t)
            if t.dim() not in (2, 3):
                raise ValueError(f"SpatialDistance {name} must have shape (N, d) or (B, N, d), got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"SpatialDistance {name} must be a floating tensor, got {t.dtype}")
        check_tensor("SpatialDistance weight", weight, 1)
        if key_coords is not None and key_coords.shape[-1] != coords.shape[-1]:
            raise ValueError(f"SpatialDistance key_coords must have coords' dimension d = {coords.shape[-1]}, "
                             f"got {key_coords.shape[-1]}")
        self.coords, self.weight, self.key_coords = coords, weight, key_coords

    def tensors(self):
        ts = (self.coords, self.weight)
        return ts if self.key_coords is None else ts + (self.key_coords,)

    def validate(self, B, H, n_q, n_k, device, dtype):
        if self.weight.shape[0] not in (1, H):
            raise ValueError(f"SpatialDistance weight must have shape (H,) = ({H},), got {tuple(self.weight.shape)}")
        _check_param("SpatialDistance", "weight", self.weight, device)
        if self.key_coords is None and n_q > n_k:
            raise ValueError(f"SpatialDistance without key_coords needs N_q <= N_k (query i uses coords row "
                             f"i + N_k - N_q), got N_q = {n_q}, N_k = {n_k}; pass key_coords")
        pairs = [("coords", self.coords, n_k if self.key_coords is None else n_q)]
        if self.key_coords is not None:
            pairs.append(("key_coords", self.key_coords, n_k))
        for name, t, n in pairs:
            _check_param("SpatialDistance", name, t, device)
            if t.shape[-2] != n or (t.dim() == 3 and t.shape[0] not in (1, B)):
                want = f"(N, d) or (B, N, d) with N = {n}, B = {B}"
                raise ValueError(f"SpatialDistance {name} must have shape {want}, got {tuple(t.shape)}")

    def _split(self, tensors, n_q, n_k):
        x = tensors[0]
        y = tensors[2] if self.key_coords is not None else x
        x = x if x.dim() == 3 else x.unsqueeze(0)
        y = y if y.dim() == 3 else y.unsqueeze(0)
        if self.key_coords is None:
            x = x[:, n_k - n_q:]
        return x, y, tensors[1]

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        x, y, w = self._split(tensors, n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        xt, yt = x[:, q0:q1].to(wd), y[:, k0:k1].to(wd)
        d2 = (xt.unsqueeze(2) - yt.unsqueeze(1)).square().sum(-1)  # (B|1, Tq, Tk)
        return -(w.to(wd).view(1, -1, 1, 1) * d2.unsqueeze(1))

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        x, y, w = self._split(tensors, n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        x = x[b.reshape(-1)] if x.shape[0] > 1 else x
        y = y[b.reshape(-1)] if y.shape[0] > 1 else y
        xt, yt = x[:, q_idx.reshape(-1)].to(wd), y[:, kv_idx.reshape(-1)].to(wd)
        d2 = (xt.unsqueeze(2) - yt.unsqueeze(1)).square().sum(-1).unsqueeze(1)  # (B'|1, 1, Tq, Tk)
        return -(w.to(wd)[h if w.shape[0] > 1 else torch.zeros_like(h)] * d2)

    def exact_rank(self, mask, n_q, n_k):
        return self.coords.shape[-1] + 2

    def exact_factors(self, mask, n_q, n_k):
        x, y, w = self._split(self.tensors(), n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        x, y, w = x.to(wd), y.to(wd), w.to(wd)
        c = y.detach().mean(dim=1, keepdim=True)  # distances are shift invariant
        x, y = x - c, y - c
        H = w.shape[0]
        wv = w.view(1, H, 1, 1)
        xs = x.unsqueeze(1)  # (B|1, 1, n_q, d)
        x2 = xs.square().sum(-1, keepdim=True)
        lead = (xs.shape[0], H, xs.shape[2])
        U = torch.cat([(2 * wv * xs).expand(*lead, xs.shape[-1]), (-wv * x2).expand(*lead, 1),
                       (-wv).expand(*lead, 1)], -1)
        ys = y.unsqueeze(1)
        V = torch.cat([ys, torch.ones_like(ys[..., :1]), ys.square().sum(-1, keepdim=True)], -1)
        return U, V

    def __repr__(self):
        return f"SpatialDistance(d={self.coords.shape[-1]}, H={self.weight.shape[0]})"


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
        def pick(t, idx):
            t = self._4d(t)
            t = t[b.reshape(-1)] if t.shape[0] > 1 else t
            t = t[:, h.reshape(-1)] if t.shape[1] > 1 else t
            return t[:, :, idx.reshape(-1)]
        u, v = pick(tensors[0], q_idx), pick(tensors[1], kv_idx)
        w = _work(torch.promote_types(u.dtype, v.dtype))
        return torch.matmul(u.to(w), v.to(w).transpose(-1, -2))

    def exact_rank(self, mask, n_q, n_k):
        return self.rank

    def exact_factors(self, mask, n_q, n_k):
        u, v = self._4d(self.u), self._4d(self.v)
        w = _work(torch.promote_types(u.dtype, v.dtype))
        return u.to(w), v.to(w)

    def __repr__(self):
        err = "" if self.rel_error is None else f", rel_error={self.rel_error:.3g}"
        return f"Factored(rank={self.rank}{err})"


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

    def __repr__(self):
        return f"BiasMod({getattr(self.fn, '__name__', 'fn')})"


def as_bias(bias) -> Bias | None:
    """Normalize the `bias=` argument: None, a spec, a float tensor (Dense) or a `bias_mod` callable."""
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, torch.Tensor):
        return Dense(bias)
    if callable(bias):
        return BiasMod(bias)
    raise TypeError(f"bias must be None, an anyattn.biases spec, a float tensor or a bias_mod callable, "
                    f"got {type(bias).__name__}")


# ---------------------------------------------------------------------------------------------------
# Truncated SVD (FlashBias for learned tables)

class LowRank(NamedTuple):
    """Result of `lowrank`: `bias` a `Factored` (u `(B|1, H|1, N_q, R)`, v likewise with N_k), its
    `rank`, the relative Frobenius error it reached (`rel_error`, worst head) and whether it is `exact`."""

    bias: Factored
    rank: int
    rel_error: float
    exact: bool


SVD_EXACT_MAX = 1024  # full SVD up to this min(N_q, N_k); randomized range finder above


def _right_basis(B: torch.Tensor, tol: float | None, rank: int | None) -> torch.Tensor:
    """Orthonormal right basis `W (N_k, K)` of one matrix `B (N_q, N_k)`, ordered by decreasing singular
    value, with K at least the rank asked for (`rank`) or needed to reach `tol`."""
    n = min(B.shape)
    if n <= SVD_EXACT_MAX:
        return torch.linalg.svd(B, full_matrices=False)[2].transpose(0, 1)
    gen = torch.Generator(device=B.device).manual_seed(0)
    normsq = B.square().sum()
    target = rank if rank is not None else 32
    while True:
        k = min(n, target + 16)
        if k >= n // 2:
            return torch.linalg.svd(B, full_matrices=False)[2].transpose(0, 1)
        omega = torch.randn(B.shape[1], k, generator=gen, device=B.device, dtype=B.dtype)
        Q = torch.linalg.qr(B @ omega).Q
        for _ in range(2):  # power iterations sharpen the leading subspace
            Q = torch.linalg.qr(B @ torch.linalg.qr(B.T @ Q).Q).Q
        _, S, Vh = torch.linalg.svd(Q.T @ B, full_matrices=False)
        if rank is not None:
            return Vh.T
        # |B - B W_r W_r^T|_F^2 <= |B|_F^2 - sum_{i<=r} s_i^2 (the two-sided projection's error).
        resid = (normsq - torch.cumsum(S.square(), 0)).clamp_min(0)
        ok = (resid <= (tol ** 2) * normsq).nonzero()
        if len(ok) and int(ok[0]) + 1 <= k - 16:
            return Vh.T
        target *= 2


def lowrank(bias, n_q: int, n_k: int, *, rank: int | None = None, tol: float | None = None,
            mask=None) -> LowRank:
    """A low-rank form `U V^T` of `bias` on an `n_q x n_k` problem (FlashBias, arXiv:2505.12044).

    An exact factorization is returned when the spec has one under `mask` (causal ALiBi, SpatialDistance,
    Factored, sums of those) and neither `rank` nor `tol` is given. Else a truncated SVD of the dense bias
    `(B|1, H|1, n_q, n_k)` per (batch, head): `rank=` keeps that many singular directions, `tol=` the
    smallest rank whose relative Frobenius error `|B - U V^T|_F / |B|_F` is at most tol in every head
    (full SVD up to min(n_q, n_k) = 1024, a randomized range finder with power iterations above). The
    factors are `U = B W`, `V = W` with W the leading right singular vectors (the orthogonal projection
    of B), differentiable in the bias parameters: gradients flow through the projection with the
    subspace held fixed. `rel_error` is the measured error of the returned factors (worst head, float64).
    Costs one dense `n_q x n_k` bias per head: compute it once for fixed tables (inference)."""
    bias = as_bias(bias)
    if bias is None:
        raise ValueError("bias must be a bias spec or tensor, got None")
    for name, val in (("n_q", n_q), ("n_k", n_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1, got {val!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if rank is not None and tol is not None:
        raise ValueError(f"give rank= or tol=, not both (got rank={rank}, tol={tol})")
    if rank is None and tol is None:
        f = bias.exact_factors(mask, n_q, n_k)
        if f is not None:
            return LowRank(Factored(*f, rel_error=0.0), f[0].shape[-1], 0.0, True)
        raise ValueError(f"bias {bias!r} has no exact low-rank form here; pass rank= or tol= for a truncated SVD")
    D = bias.dense(n_q, n_k)
    D = D.reshape((1,) * (4 - D.dim()) + tuple(D.shape))
    lead = D.shape[:2]
    mats = D.detach().reshape(-1, n_q, n_k)
    bases = []
    with torch.no_grad():
        needed = []
        for m in mats:
            md = m.double()
            W = _right_basis(md, tol, rank)
            if rank is not None:
                needed.append(min(rank, W.shape[1]))
            else:
                normsq = md.square().sum()
                captured = torch.cumsum((md @ W).square().sum(0), 0)  # |B W_r|_F^2, r = 1..K
                ok = (normsq - captured <= (tol ** 2) * normsq).nonzero()
                needed.append(int(ok[0]) + 1 if len(ok) else W.shape[1])
            bases.append(W)
        r = max(needed)
        for i, m in enumerate(mats):  # heads whose basis is narrower than the common rank
            if bases[i].shape[1] < r:
                bases[i] = _right_basis(m.double(), None, r)
        err = 0.0
        for m, W in zip(mats, bases):  # measured directly (a cumulative curve cancels below ~1e-8)
            md, Wd = m.double(), W[:, :r]
            nrm = md.norm()
            if nrm > 0:
                err = max(err, float((md - (md @ Wd) @ Wd.T).norm() / nrm))
        Wr = torch.stack([W[:, :r] for W in bases]).reshape(*lead, n_k, r).to(D.dtype)
    U = D @ Wr
    return LowRank(Factored(U, Wr, rel_error=err), r, err, False)
