"""Which approximate method `method="auto"` may use when the caller passes `tolerance=`.

Conservative by construction (`plan.choose` calls `choose_approximate`; None means "stay exact"):
- nothing below `MIN_KEYS` keys (exact attention is cheap there) and nothing with a bias;
- candidates in order: `hyper` then `performer`, each only if it supports the request;
- a candidate is accepted only after it was *measured*: it runs once (default options, no
  gradients) and its output is compared with exact attention on `SAMPLE_ROWS` query rows drawn with a
  fixed seed; its estimated relative Frobenius error must be at most `tolerance * SAFETY`.
The check costs one approximate forward plus `SAMPLE_ROWS` exact rows (O(SAMPLE_ROWS * N_k * D)).
Options passed to `attention(..., method="auto", **options)` go to the chosen method but the check
uses its defaults.
"""
from __future__ import annotations

import torch

from ..masks import Causal, Dense, KeyPadding
from ..registry import Request, get

MIN_KEYS = 4096
SAMPLE_ROWS = 128
SAFETY = 0.5
CANDIDATES = ("hyper", "performer")


def _rows_mask(req: Request, rows: torch.Tensor):
    m, sh = req.mask, req.shape
    if m is None or isinstance(m, KeyPadding):
        return m
    if isinstance(m, Causal):
        off = m.offset(sh.N_q, sh.N_k)
        kv = torch.arange(sh.N_k, device=rows.device)
        return Dense((kv.view(1, -1) <= rows.view(-1, 1) + off).view(1, 1, len(rows), sh.N_k))
    return None


def estimate_error(req: Request, name: str, sample_rows: int = SAMPLE_ROWS) -> float | None:
    """Relative Frobenius error of method `name` (default options) on `sample_rows` query rows of `req`,
    or None when the rows' exact reference cannot be formed for this mask."""
    from ..api import attention
    from .error import relative_errors

    sh = req.shape
    g = torch.Generator().manual_seed(0)
    rows = torch.randperm(sh.N_q, generator=g)[:min(sample_rows, sh.N_q)].sort().values.to(req.q.device)  # host: seeded
    rmask = _rows_mask(req, rows)
    if req.mask is not None and rmask is None:
        return None
    with torch.no_grad():
        out, _ = get(name).run(Request(req.q, req.k, req.v, req.mask, None, req.scale, sh, False))
        ref = attention(req.q[:, :, rows], req.k, req.v, mask=rmask, scale=req.scale)
    frob, _ = relative_errors(out[:, :, rows], ref)
    return frob


def choose_approximate(req: Request, tolerance: float):
    """An `Explanation` naming an approximate method measured to meet `tolerance`, or None."""
    from ..plan import Explanation

    sh = req.shape
    if req.bias is not None or sh.N_k < MIN_KEYS or tolerance <= 0:
        return None
    for name in CANDIDATES:
        try:
            m = get(name)
        except ValueError:
            continue
        if m.supports(req) is not None:
            continue
        err = estimate_error(req, name)
        if err is not None and err <= tolerance * SAFETY:
            return Explanation(name, f"tolerance={tolerance:g}: {name} measured a relative Frobenius error of "
                                     f"{err:.3g} on {min(SAMPLE_ROWS, sh.N_q)} sampled query rows (<= "
                                     f"{SAFETY:g} x tolerance) and N_k={sh.N_k} >= {MIN_KEYS}")
    return None
