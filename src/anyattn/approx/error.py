"""`anyattn.error`: how far an approximate method's output is from exact attention.

    err = anyattn.error(q, k, v, "hyper", mask=Causal(), seed=0)
    err.frobenius   # |O - O*|_F / |O*|_F
    err.max_row     # max_i |O_i - O*_i| / |O*_i|  over rows with O*_i != 0

The exact output `O*` comes from `anyattn.attention(..., method=exact)` (default "auto": sdpa or
blocked, never an approximation). Both outputs are computed without gradients; the norms in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ApproxError(NamedTuple):
    """Relative output errors of one call: `frobenius` = |O - O*|_F / |O*|_F; `max_row` = the largest
    relative error of one query row (rows whose exact output is 0 count only if the approximation is
    not 0 there, as inf); `method`, `exact`: the two methods compared."""

    frobenius: float
    max_row: float
    method: str
    exact: str

    def __str__(self):
        return (f"{self.method} vs {self.exact}: relative Frobenius error {self.frobenius:.3e}, "
                f"max row error {self.max_row:.3e}")


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """`(frobenius, max_row)` relative errors of `out` against `ref` (same shape `(..., N, D_v)`)."""
    if out.shape != ref.shape:
        raise ValueError(f"out must have ref's shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    o, r = out.detach().double(), ref.detach().double()
    d = o - r
    dn, rn = d.norm(), r.norm()
    frob = float(dn / rn) if rn > 0 else (0.0 if dn == 0 else float("inf"))
    drow, rrow = d.norm(dim=-1), r.norm(dim=-1)
    nz = rrow > 0
    rel = torch.where(nz, drow / torch.where(nz, rrow, torch.ones_like(rrow)),
                      torch.where(drow > 0, torch.full_like(drow, float("inf")), torch.zeros_like(drow)))
    return frob, float(rel.max()) if rel.numel() else 0.0


def error(q, k, v, method: str, *, mask=None, bias=None, scale=None, exact: str = "auto", **options) -> ApproxError:
    """Relative output error of `attention(q, k, v, method=method, **options)` against exact attention.

    q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`; mask, bias, scale as in
    `anyattn.attention`; exact: the exact method to compare with ("auto", "sdpa", "blocked" or
    "reference"). Returns an `ApproxError(frobenius, max_row, method, exact)`.
    """
    from ..api import attention, explain
    from ..registry import get

    if not isinstance(method, str) or method == "auto":
        raise ValueError(f"method must be the name of a registered method (not 'auto'), got {method!r}")
    get(method)
    if exact != "auto" and not get(exact).exact:
        raise ValueError(f"exact must name an exact method ('auto', 'sdpa', 'blocked', 'reference'), got {exact!r}")
    with torch.no_grad():
        out = attention(q, k, v, mask=mask, bias=bias, scale=scale, method=method, **options)
        name = explain(q, k, v, mask=mask, bias=bias, scale=scale).method if exact == "auto" else exact
        ref = attention(q, k, v, mask=mask, bias=bias, scale=scale, method=name)
    frob, max_row = relative_errors(out, ref)
    return ApproxError(frob, max_row, method, name)
