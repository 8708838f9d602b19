"""Shared log-sum-exp math: the online-softmax update used by tiled engines and the exact merge of
partial attentions (ring attention, extra KV tokens, split-K decoding). One place, called by all."""
from __future__ import annotations

from typing import Sequence

import torch

NEG_INF = float("-inf")


def finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """Replace -inf (rows that have seen no key yet) by 0 so `exp(s - m)` never forms `-inf - -inf`."""
    return torch.where(m == NEG_INF, torch.zeros((), dtype=m.dtype, device=m.device), m)


def online_softmax_step(s: torch.Tensor, m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key tile of the FlashAttention-2 forward (METHODS.md "Blocked").

    s: scores `(..., Tq, Tk)` (masked entries -inf; overwritten in place), m, l: running max and sum
    `(..., Tq)`, acc: unnormalized output `(..., Tq, D_v)` (updated in place), v: `(..., Tk, D_v)`.
    Returns the new `(m, l, acc)`.
    """
    m_new = torch.maximum(m, s.amax(dim=-1))
    m_safe = finite_or_zero(m_new)
    alpha = torch.exp(m - m_safe)
    p = s.sub_(m_safe.unsqueeze(-1)).exp_()
    l = torch.addcmul(p.sum(dim=-1), l, alpha)
    acc.mul_(alpha.unsqueeze(-1)).add_(torch.matmul(p.to(v.dtype), v))
    return m_new, l, acc


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
