"""`method="auto"`: pick a method from the specs, the shapes and the device, and say why.

Rules (exact methods only unless the caller passes `tolerance=`):
1. `sdpa` when the request is expressible there (no mask, causal, dense mask/bias) and any mask it
   would have to materialize is small (at most `MAX_SDPA_MASK_ELEMENTS` entries), and the LSE, when
   asked for, comes out of a fused kernel on this device and dtype (`sdpa.lse_supported`);
2. `neighborhood` for a `masks.Neighborhood` spec without bias (its engine, or NATTEN's kernels on CUDA);
3. otherwise, on CUDA, `flex` (compiled FlexAttention: the spec as mask_mod/score_mod and a block mask
   from its tile ranges, forward and backward fused) when it can run the request; on CPU only for large
   inference calls (no gradients, no LSE, `B*H*N_q*N_k >= CPU_FLEX_MIN_WORK`), where its compiled
   forward was measured faster than `blocked` and the compile time is repaid (`ANYATTN_NO_COMPILE=1`
   turns it off, as for the compiled selective scan);
4. otherwise `blocked`, which handles every mask and bias spec with tile skipping in O(N) memory.

After `anyattn tune`, a measured winner for the request's class (`anyattn.tune.measured_route`) replaces
these rules when it can run the request; the explanation quotes the timings.

With a bias (`_choose_bias`), three routes compete:
- `lowrank_bias` when the bias has an exact low-rank form under the mask (causal ALiBi, SpatialDistance,
  Factored, sums of those) that is precise and cheap: the fused kernel runs at head dim
  `ceil8(D + R)` with O(N) memory, so its cost is compared with unbiased attention at head dim D;
- `sdpa` with the bias tensor when it is already dense (a tensor), or with the analytic bias
  materialized when that is small (at most `MAX_SDPA_BIAS_ELEMENTS` entries);
- `blocked` with the bias computed per tile otherwise (no `N_q x N_k` tensor, forward and backward).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .masks import Causal, Neighborhood
from .registry import Request, get
from .tune import measured_route

MAX_SDPA_MASK_ELEMENTS = 1 << 24
MAX_SDPA_BIAS_ELEMENTS = 1 << 24  # materialize an analytic bias for SDPA only up to this (64 MiB in fp32)
MAX_LOWRANK_COST = 2.5  # lowrank_bias's fused-kernel cost relative to unbiased attention, at most
MAX_FACTOR_SCORE_ERROR = 1e-5  # absolute score error the factor arithmetic may add (see Alibi.factor_error)
CPU_FLEX_MIN_WORK = 1 << 26  # CPU inference calls with at least this many score entries go to compiled flex


def choose_approximate(req: Request, tolerance: float):
    """An approximate method expected to meet `tolerance` and be faster than exact, or None
    (see `anyattn.approx.select`)."""
    from .approx.select import choose_approximate as choose_approx
    return choose_approx(req, tolerance)


@dataclass(frozen=True)
class Explanation:
    method: str
    reason: str
    measured: dict | None = None  # the tune-cache record behind a measured choice

    def __str__(self):
        return f"{self.method}: {self.reason}"


def choose(req: Request, tolerance: float | None = None) -> Explanation:
    if tolerance is not None:
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise ValueError(f"tolerance must be a number >= 0, got {tolerance!r}")
        pick = choose_approximate(req, float(tolerance))
        if pick is not None:
            return pick
    hit = measured_route(req)
    if hit is not None:
        return Explanation(*hit)
    sh = req.shape
    if req.mask is None and req.bias is None:
        if not _lse_ok(req):
            return _not_sdpa(req, f"the LSE was requested and SDPA returns none for {req.q.dtype} on "
                                  f"{req.q.device.type}")
        return Explanation("sdpa", "no mask or bias: torch SDPA's fused kernel applies" + _on(req))
    if isinstance(req.mask, Neighborhood) and req.bias is None:
        from .softmax.neighborhood import backend_choice, explain_tiles
        choice = backend_choice(req.q, req.return_lse)
        tiles = f" ({explain_tiles(req)})" if choice.backend == "anyattn" else ""
        return Explanation("neighborhood", "a Neighborhood spec: " + choice.reason + tiles)
    if req.bias is not None:
        return _choose_bias(req)
    reason = get("sdpa").supports(req)
    if reason is None:
        materialized = isinstance(req.mask, Causal) and req.mask.align == "bottom_right" \
            and sh.N_q not in (1, sh.N_k)
        if materialized and sh.N_q * sh.N_k > MAX_SDPA_MASK_ELEMENTS:
            return _not_sdpa(req, f"bottom-right causal with N_q={sh.N_q} != N_k={sh.N_k} would need a "
                                  f"{sh.N_q}x{sh.N_k} dense mask for SDPA", "blocked skips tiles instead")
        what = "causal" if isinstance(req.mask, Causal) else "the dense mask/bias"
        return Explanation("sdpa", f"{what} is expressible in torch SDPA's fused kernel" + _on(req))
    return _not_sdpa(req, f"not expressible in SDPA ({reason})",
                     "blocked evaluates the spec per tile and skips empty tiles")


def _on(req: Request) -> str:
    if req.return_lse:
        kernel = "CPU flash kernel" if req.q.device.type == "cpu" else "memory-efficient kernel"
        return f" (the LSE from the {kernel} on {req.q.device.type})"
    return f" (on {req.q.device.type})"


def _lse_ok(req: Request) -> bool:
    from .softmax.sdpa import lse_supported
    return not req.return_lse or lse_supported(req.q.device, req.q.dtype)


def _not_sdpa(req: Request, why: str, blocked_how: str = "blocked evaluates the spec per tile and skips "
                                                            "empty tiles") -> Explanation:
    """SDPA cannot run `req` (`why`): `flex` on CUDA when it can, else `blocked`."""
    from .softmax.flex import compiled_supports
    if req.q.device.type == "cuda":
        flex_reason = compiled_supports(req)
        if flex_reason is None:
            return Explanation("flex", f"{why}; on CUDA compiled FlexAttention runs the spec fused (mask_mod/"
                                       "score_mod, block mask from the spec's tile ranges, forward and backward)")
        return Explanation("blocked", f"{why}, and FlexAttention cannot run it ({flex_reason}); {blocked_how}")
    if req.q.device.type == "cpu":
        flex_reason = compiled_supports(req) or _cpu_flex_reason(req)
        if flex_reason is None:
            return Explanation("flex", f"{why}; an inference call this large (B*H*N_q*N_k = {sh_work(req):.2g}) "
                                       "runs faster in compiled FlexAttention's CPU kernel (forward measured 1.3-3x "
                                       "faster than blocked at N=4096; the first call per shape compiles; "
                                       "ANYATTN_NO_COMPILE=1 turns this off)")
        return Explanation("blocked", f"{why}; {blocked_how} (flex not used on CPU: {flex_reason})")
    return Explanation("blocked", f"{why}; {blocked_how}")


def _cpu_flex_reason(req: Request) -> str | None:
    """Why a CPU request that compiled flex could run stays on blocked (None: use flex)."""
    if os.environ.get("ANYATTN_NO_COMPILE", "") not in ("", "0"):
        return "ANYATTN_NO_COMPILE is set"
    if sh_work(req) < CPU_FLEX_MIN_WORK:
        return f"B*H*N_q*N_k = {sh_work(req):.2g} < {CPU_FLEX_MIN_WORK:.2g} does not repay compiling"
    return None


def sh_work(req: Request) -> int:
    """Score entries of the request, `B * H * N_q * N_k`."""
    sh = req.shape
    return sh.B * sh.H * sh.N_q * sh.N_k


def _sdpa_mask_form(req: Request) -> str | None:
    """None when the mask has a cheap SDPA form, else why not (without materializing anything)."""
    from .masks import Dense as DenseMask
    sh, mask = req.shape, req.mask
    if mask is None or isinstance(mask, DenseMask):
        return None
    if isinstance(mask, Causal):
        if mask.align == "bottom_right" and sh.N_q not in (1, sh.N_k) and sh.N_q * sh.N_k > MAX_SDPA_MASK_ELEMENTS:
            return f"bottom-right causal with N_q={sh.N_q} != N_k={sh.N_k} needs a dense {sh.N_q}x{sh.N_k} mask"
        return None
    return f"mask {mask!r} has no SDPA form"


def _mib(n_elements: int) -> str:
    return f"{n_elements * 4 / 2 ** 20:.0f} MiB"


def _choose_bias(req: Request) -> Explanation:
    """Pick among lowrank_bias, sdpa (dense or materialized bias) and blocked (per-tile bias)."""
    from .biases import Dense as DenseBias, Factored
    from .softmax import lowrank_bias as _lowrank_bias  # noqa: F401  (registers the method it may pick)
    sh, bias, mask = req.shape, req.bias, req.mask
    terms = bias.terms()
    mask_reason = _sdpa_mask_form(req)
    lse_ok = _lse_ok(req)
    sdpa_ok = mask_reason is None and lse_ok
    # The CPU flash op behind return_lse=True returns no gradient for a float attn_mask.
    bias_grad = any(t.requires_grad for t in bias.tensors())
    if req.return_lse and bias_grad:
        sdpa_ok = False
    # Materialized bias size: per (batch, head) broadcast of the spec, upper bound H * N_q * N_k (times B
    # for batch-dependent specs such as SpatialDistance with (B, N, d) coordinates).
    n_dense = sh.H * sh.N_q * sh.N_k
    if any(getattr(t, "coords", None) is not None and t.coords.dim() == 3 for t in terms):
        n_dense *= sh.B
    svd_note = ""
    for t in terms:
        if isinstance(t, Factored) and t.rel_error is not None and t.rel_error > 0:
            svd_note = (f" (the factors are a truncated SVD of rank {t.rank} with relative Frobenius error "
                        f"{t.rel_error:.3g})")
    if req.q.device.type == "cuda" and not (all(isinstance(t, DenseBias) for t in terms) and sdpa_ok):
        from .softmax.flex import compiled_supports
        flex_reason = compiled_supports(req)
        if flex_reason is None:
            return Explanation("flex", "on CUDA the bias runs fused as FlexAttention's score_mod (exact, no "
                                       "materialized bias, no extra head-dim columns; gradients to its tensors)"
                                       + ("" if mask is None else ", the mask as mask_mod with a block mask from "
                                          "its tile ranges"))
    rank = bias.exact_rank(mask, sh.N_q, sh.N_k)
    if rank is not None:
        err = sum(getattr(t, "factor_error", lambda n_k: 0.0)(sh.N_k) for t in terms)
        W = -(-(sh.D + rank) // 8) * 8
        dv = max(W, sh.D_v) if req.q.device.type == "cpu" else sh.D_v
        cost = (W + dv) / (sh.D + sh.D_v)
        low = " computed in float32" if req.q.dtype in (torch.bfloat16, torch.float16) else ""
        if err > MAX_FACTOR_SCORE_ERROR:
            return Explanation("blocked", f"the bias's exact rank-{rank} form would add score errors up to "
                                          f"{err:.2g} at N_k={sh.N_k}; blocked computes it per tile exactly")
        from .biases import Alibi
        if isinstance(bias, Alibi) and isinstance(mask, Causal) and sh.N_q == sh.N_k \
                and sh.N_k >= _lowrank_bias.BAND_MIN_N:
            svd_note += ("; heads whose slope makes far keys negligible (their total weight provably below "
                         "exp(-20)) attend only a window, in chunks")
        if cost <= MAX_LOWRANK_COST:
            engine = "SDPA's fused kernel" if sdpa_ok or (mask_reason is None and lse_ok) else "the blocked engine"
            return Explanation("lowrank_bias", f"the bias is exactly rank {rank} here{svd_note}: [U, q*scale].[V, k] "
                                               f"through {engine} at head dim {W}{low} (about {cost:.2f}x the cost of "
                                               f"unbiased attention), O(N) memory instead of a {_mib(n_dense)} "
                                               "dense bias")
        why_not = f"its exact rank-{rank} form would cost {cost:.1f}x unbiased attention"
    else:
        why_not = "it has no exact low-rank form under this mask (a truncated SVD is available with " \
                  "method='lowrank_bias', rank= or tol=, or anyattn.biases.lowrank)"
    if all(isinstance(t, DenseBias) for t in terms):
        if sdpa_ok:
            return Explanation("sdpa", f"the bias is a dense tensor and {why_not}: SDPA takes it as attn_mask")
        return Explanation("blocked", f"the bias is a dense tensor, {why_not}, and SDPA cannot run this "
                                      f"request ({mask_reason or 'it returns no LSE or no bias gradient with the LSE here'}); "
                                      "blocked reads it tile by tile")
    if sdpa_ok and n_dense <= MAX_SDPA_BIAS_ELEMENTS:
        return Explanation("sdpa", f"{why_not}; the materialized bias ({_mib(n_dense)}) is small, so SDPA's fused "
                                   "kernel with it beats per-tile evaluation")
    if not sdpa_ok:
        where = mask_reason or "SDPA returns no LSE (or no bias gradient with it) here"
        return Explanation("blocked", f"{why_not}, and SDPA cannot take it ({where}); blocked computes the bias "
                                      "per tile with O(N) memory and returns gradients to its parameters")
    return Explanation("blocked", f"{why_not}, and materializing it would take {_mib(n_dense)}; blocked computes "
                                  "it per tile with O(N) memory and returns gradients to its parameters")
