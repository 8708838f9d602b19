"""Learned relative-position tables: T5 buckets, Swin 2-D tables."""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..validate import check_tensor
from .base import Bias, _check_param, _positions, _work, pick

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

    def _t5_lut(self, n_q, n_k, device):
        """T5 bucket of every key-minus-query distance `kp - qp` in `[-(n_k - 1), n_q - 1]` (entry
        `kp - qp + n_k - 1`): the bucket depends only on the distance, so it is evaluated once."""
        key = (n_q, n_k, device)
        if self._lut is None or self._lut[0] != key:
            rel = torch.arange(-(n_k - 1), n_q, device=device)
            self._lut = (key, self.index(torch.zeros(1, 1, dtype=torch.long, device=device), rel.view(1, -1))[0])
        return self._lut[1]

    def _index(self, q0, q1, k0, k1, n_q, n_k, device):
        qp, kp = _positions(q0, q1, k0, k1, n_q, n_k, device, torch.long)
        if self.kind == "t5":
            return self._t5_lut(n_q, n_k, device)[kp - qp + (n_k - 1)]
        return self.index(qp, kp)

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        t = tensors[0]
        idx = self.index(q_idx.reshape(-1, 1) + (n_k - n_q), kv_idx.reshape(1, -1))
        return t.to(_work(t.dtype))[idx.unsqueeze(0).unsqueeze(0), h if t.shape[1] > 1 else torch.zeros_like(h)]

    def bias_mod(self, n_q, n_k):
        t, off = self.table, n_k - n_q
        if self.kind == "t5":
            lut = self._t5_lut(n_q, n_k, t.device)
            return lambda b, h, q_idx, kv_idx: t[lut[kv_idx - q_idx - off + (n_k - 1)], pick(h, t.shape[1])]
        return lambda b, h, q_idx, kv_idx: t[self.index(q_idx + off, kv_idx), pick(h, t.shape[1])]

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        t = tensors[0]
        idx = self._index(q0, q1, k0, k1, n_q, n_k, t.device)
        return t.to(_work(t.dtype)).t()[:, idx].unsqueeze(0)  # (1, H, Tq, Tk)

    def __repr__(self):
        return f"RelativePosition.{self.kind}(table={tuple(self.table.shape)})"
