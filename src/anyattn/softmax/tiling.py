"""Tiling shared by the blocked engines (blocked softmax attention, Parallax, Local Linear Attention):
the plan of one call, the key tiles of a query tile (skipping what the mask empties), a tile's scores with
bias and mask applied, and the grouped-query row layout `(B, H_kv, G * Tq, ...)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lse import NEG_INF
from ..masks import Mask, Span
from ..validate import Shape


@dataclass
class Plan:
    shape: Shape
    scale: float
    mask: Mask | None
    bias: object | None
    block_q: int
    block_k: int
    spans: list
    stat: torch.dtype | None = None  # dtype of scores, statistics and accumulators (None: the inputs')


def segments(span: Span, block_k: int, masked: bool):
    """Key tiles `(k0, k1, needs_mask)` covering `[lo, hi)`, split at the full range's borders."""
    if not masked:
        return [(k0, min(k0 + block_k, span.hi), False) for k0 in range(span.lo, span.hi, block_k)]
    out = []
    for a, b, m in ((span.lo, span.full_lo, True), (span.full_lo, span.full_hi, False), (span.full_hi, span.hi, True)):
        out.extend((k0, min(k0 + block_k, b), m) for k0 in range(a, b, block_k))
    return out


def rows(t: torch.Tensor, shape: Shape, tq: int) -> torch.Tensor:
    """A `(B|1, H|1, Tq|1, Tk)` tile -> the engine's `(B|1, H_kv|1, G*Tq|1, Tk)` row layout."""
    G = shape.groups
    b, h, r, c = t.shape
    if h == 1 and (r == 1 or G == 1):
        return t
    if h == 1:
        return t.unsqueeze(2).expand(b, 1, G, r, c).reshape(b, 1, G * r, c)
    t = t.reshape(b, shape.H_kv, G, r, c)
    if r == 1 and G == 1:
        return t.reshape(b, shape.H_kv, 1, c)
    return t.expand(b, shape.H_kv, G, tq, c).reshape(b, shape.H_kv, G * tq, c)


def scores(plan: Plan, qt, k, q0, q1, k0, k1, needs_mask, bias_tensors):
    """Scores of one tile with bias added and masked entries at -inf; also the tile's allowed mask in
    row layout (None when the tile needs no mask)."""
    s = torch.matmul(qt, k[:, :, k0:k1].transpose(-1, -2))
    if plan.stat is not None and s.dtype != plan.stat:
        s = s.to(plan.stat)
    return mask_scores(plan, s, q0, q1, k0, k1, needs_mask, bias_tensors)


def mask_scores(plan: Plan, s, q0, q1, k0, k1, needs_mask, bias_tensors):
    """`scores` for a tile whose products `s` (row layout) are already computed (e.g. by a matmul shared
    with other rows): bias added and masked entries set to -inf in place."""
    tq = q1 - q0
    allowed = None
    if plan.bias is not None:
        bt = plan.bias.tile(bias_tensors, q0, q1, k0, k1, plan.shape.N_q, plan.shape.N_k)
        s.add_(rows(bt.detach().to(s.dtype), plan.shape, tq))
    if needs_mask:
        allowed = rows(plan.mask.tile(q0, q1, k0, k1, plan.shape.N_q, plan.shape.N_k, s.device), plan.shape, tq)
        s.masked_fill_(~allowed, NEG_INF)
    return s, allowed


def q_tile(qg, q0, q1, scale, stat=None):
    """Scaled query rows of one tile: `(B, H_kv, G*Tq, D)` in q's dtype (scaled in `stat` when given and
    wider, rounded once)."""
    B, Hkv, G, _, D = qg.shape
    qt = qg[:, :, :, q0:q1]
    qt = qt * scale if stat is None or qt.dtype == stat else (qt.to(stat) * scale).to(qt.dtype)
    return qt.reshape(B, Hkv, G * (q1 - q0), D)


def make_plan(shape: Shape, scale: float, mask, bias, block_q: int, block_k: int, stat=None) -> Plan:
    """The plan of one call: the key span of every query tile from the mask (everything without one);
    `stat`: the dtype scores are computed in (None: the inputs')."""
    spans = mask.tile_ranges(shape.N_q, shape.N_k, block_q) if mask is not None else \
        [Span(0, shape.N_k, 0, shape.N_k)] * ((shape.N_q + block_q - 1) // block_q)
    return Plan(shape, scale, mask, bias, block_q, block_k, spans, stat)
