"""`method="auto"`: pick a method from the specs, the shapes and the device, and say why.

Rules (exact methods only unless the caller passes `tolerance=`):
1. `sdpa` when the request is expressible there (no mask, causal, dense mask/bias) and any mask it
   would have to materialize is small (at most `MAX_SDPA_MASK_ELEMENTS` entries);
2. otherwise `blocked`, which handles every mask and bias spec with tile skipping in O(N) memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from .masks import Causal
from .registry import Request, get

MAX_SDPA_MASK_ELEMENTS = 1 << 24


def choose_approximate(req: Request, tolerance: float):
    """An approximate method expected to meet `tolerance` and be faster than exact, or None."""
    return None


@dataclass(frozen=True)
class Explanation:
    method: str
    reason: str

    def __str__(self):
        return f"{self.method}: {self.reason}"


def choose(req: Request, tolerance: float | None = None) -> Explanation:
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
        pick = choose_approximate(req, float(tolerance))
        if pick is not None:
            return pick
    sh = req.shape
    if req.mask is None and req.bias is None:
        if req.return_lse and req.q.device.type != "cpu":
            return Explanation("blocked", f"the LSE was requested and SDPA returns none on {req.q.device.type}")
        return Explanation("sdpa", "no mask or bias: torch SDPA's fused kernel applies")
    reason = get("sdpa").supports(req)
    if reason is None:
        materialized = isinstance(req.mask, Causal) and req.mask.align == "bottom_right" \
            and sh.N_q not in (1, sh.N_k)
        if materialized and sh.N_q * sh.N_k > MAX_SDPA_MASK_ELEMENTS:
            return Explanation("blocked", f"bottom-right causal with N_q={sh.N_q} != N_k={sh.N_k} would need a "
                                          f"{sh.N_q}x{sh.N_k} dense mask for SDPA; blocked skips tiles instead")
        what = "causal" if isinstance(req.mask, Causal) else "the dense mask/bias"
        return Explanation("sdpa", f"{what} is expressible in torch SDPA's fused kernel")
    return Explanation("blocked", f"not expressible in SDPA ({reason}); blocked evaluates the spec per tile "
                                  "and skips empty tiles")
