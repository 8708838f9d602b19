"""Shared log-sum-exp math: the online-softmax update used by tiled engines and the exact merge of
partial attentions (ring attention, extra KV tokens, split-K decoding). One place, called by all."""
from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """Replace -inf (rows that have seen no key yet) by 0 so `exp(s - m)` never forms `-inf - -inf`."""
    return torch.where(m == NEG_INF, torch.zeros((), dtype=m.dtype, device=m.device), m)


#: Exponents below this are clamped before exp: exp(-80) ~ 1.8e-35 is still a normal float, while
#: exp of values near -90 (denormal results) or far below runs several times slower on CPU. The error
#: this adds is at most N * 1.8e-35 relative to a row sum >= 1: far below float64 precision.
EXP_FLOOR = -80.0


#: exp(x) = 2 ** (x * LOG2E): torch's CPU exp2 kernel is about 3x faster than its exp kernel (both within
#: 1 ulp); the product adds a relative error of at most |x| * 2**-24 (fp32), i.e. below 1e-6 for the
#: weights that matter (x > -20) and far below everything else.
LOG2E = 1.4426950408889634


def exp_shifted_(s: torch.Tensor, shift: torch.Tensor, floor: bool, allowed: torch.Tensor | None) -> torch.Tensor:
    """In place `exp(s - shift)`; with `floor`, exponents are clamped at EXP_FLOOR and entries not
    `allowed` (the masked ones, -inf in s) are set back to exactly 0."""
    s.sub_(shift)
    if floor:
        s.clamp_(min=EXP_FLOOR)
    s.mul_(LOG2E).exp2_()
    if floor and allowed is not None:
        s.masked_fill_(~allowed, 0.0)
    return s


def online_softmax_step(s: torch.Tensor, m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,
                        v: torch.Tensor, floor: bool = False, allowed: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key tile of the FlashAttention-2 forward (METHODS.md "Blocked").

    s: scores `(..., Tq, Tk)` (masked entries -inf; overwritten in place), m, l: running max and sum
    `(..., Tq)`, acc: unnormalized output `(..., Tq, D_v)` (updated in place), v: `(..., Tk, D_v)`.
    floor / allowed: see `exp_shifted_` (worth it when a bias spreads scores far below the row max).
    Returns the new `(m, l, acc)`.
    """
    p, alpha, m_new, l = online_softmax_weights(s, m, l, floor, allowed)
    acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p.to(v.dtype), v))
    return m_new, l, acc


def online_softmax_weights(s: torch.Tensor, m: torch.Tensor, l: torch.Tensor, floor: bool = False,
                           allowed: torch.Tensor | None = None):
    """The probability part of one online-softmax step, for engines with several accumulators: returns
    `(p, alpha, m_new, l_new)` with `p = exp(s - m_new)` (in place in s) and `alpha = exp(m - m_new)`, the
    factor by which every accumulator of these rows must be rescaled before adding this tile's part."""
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = finite_or_zero(m_new)
    alpha = torch.exp(m - m_safe)
    p = exp_shifted_(s, m_safe.unsqueeze(-1), floor, allowed)
    l = torch.addcmul(p.sum(dim=-1), l, alpha)
    return p, alpha, m_new, l


def finish(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalize an online-softmax accumulator: `out = acc / l` (0 where no key was seen), `lse = m + log l`
    (-inf there)."""
    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l).unsqueeze(-1)
    lse = torch.where(empty, torch.full_like(m, NEG_INF), m + torch.log(l))
    return out, lse


def merge(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions over disjoint key sets into attention over their union, exactly.

    outs: each `(..., N, D_v)`; lses: each `(..., N)` (natural log, -inf for rows that saw no key).
    Returns `(out, lse)`; rows empty in every part give 0 and -inf. Differentiable in outs and lses
    (no NaN gradients for empty rows).
    """
    from .validate import check_tensor

    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge needs as many lses as outs (at least one), got {len(outs)} outs and {len(lses)} lses")
    for i, (o, s) in enumerate(zip(outs, lses)):
        check_tensor(f"outs[{i}]", o)
        check_tensor(f"lses[{i}]", s)
        if o.shape[:-1] != s.shape:
            raise ValueError(f"lses[{i}] must have shape outs[{i}].shape[:-1] = {tuple(o.shape[:-1])}, got {tuple(s.shape)}")
        if o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] must have outs[0]'s shape {tuple(outs[0].shape)}, got {tuple(o.shape)}")
        if o.device != outs[0].device or s.device != outs[0].device:
            raise ValueError(f"outs[{i}] and lses[{i}] must be on outs[0]'s device {outs[0].device}")
    stat_dtype = torch.promote_types(lses[0].dtype, torch.float32)
    lse_stack = torch.stack([s.to(stat_dtype) for s in lses])
    m = finite_or_zero(lse_stack.amax(dim=0))
    w = torch.exp(lse_stack - m)  # (P, ..., N); 0 for empty parts
    total = w.sum(dim=0)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    out = sum(o.to(stat_dtype) * (wi / safe_total).unsqueeze(-1) for o, wi in zip(outs, w))
    lse = torch.where(empty, torch.full_like(total, NEG_INF), m + torch.log(safe_total))
    return out.to(outs[0].dtype), lse
