"""FlashBias: attention with a low-rank bias through a fast unbiased kernel (METHODS.md "FlashBias";
Wu et al. 2025, "FlashBias: Fast Computation of Attention with Bias", arXiv:2505.12044).

If `bias = U V^T` (U `(N_q, R)`, V `(N_k, R)`), then `q k^T * scale + U V^T = [U, q*scale] [V, k]^T`:
concatenate and run SDPA with `scale=1` (or the blocked engine when the mask has no SDPA form) at head
dim `D + R` rounded up to a multiple of 8. On CPU, v is zero-padded to the same width (torch's CPU SDPA
leaves its fast path, about 4x slower, when v's head dim differs) and the output sliced.

Factors: exact where they exist (causal ALiBi rank 2 (4 for slopes that need a hi/lo split),
`SpatialDistance` rank d + 2, `Factored`), else a truncated SVD (`rank=` or `tol=`, see
`biases.lowrank`) whose reached error is reported in `report`. Bias terms without exact factors and
without `rank`/`tol` stay additive biases of the engine (materialized for SDPA, per tile for blocked).

Causal ALiBi band route (N_q == N_k >= 2048, `band=True`): keys farther than
`w = (max_i(scale |q_i| max|k| - scale q_i.k_i) + ln N + E) / slope` from the query carry together at most
`exp(-E)` of its probability mass (E = 20 for float32 work, 40 for float64; see `alibi_windows`), so heads
with `w` well below N attend their window
only, in query chunks of C (keys `[start - w, end)`, chunk-local rank-2 factors, a shared causal mask);
a small cost model (`band_groups`) groups heads by window and leaves the others on the full rank-2 route.

Precision: factor arithmetic runs in float32 or wider, positions are centered, and the bias columns
come first in the concatenation so the kernel's dot products add the (exactly representable) bias
terms before q.k; low-precision inputs are computed in float32 and cast back. Gradients reach the
factors by autograd through the concatenation, and through them every bias parameter.
"""
from __future__ import annotations

import math

import torch

from ..biases import Sum, concat_factors, lowrank
from ..registry import Method, Request, register
from ..validate import Shape, check_positive_int
from .blocked import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blocked_attention
from .sdpa import lower, lse_supported, sdpa_attention

ENGINES = ("auto", "sdpa", "blocked")


def _sum(terms):
    out = terms[0]
    for t in terms[1:]:
        out = Sum(out, t)
    return out


def factorize(bias, mask, n_q: int, n_k: int, rank=None, tol=None):
    """Split `bias` into low-rank factors and a residual spec. Returns `(U, V, residual, info)`:
    U `(B|1, H|1, n_q, R)`, V `(B|1, H|1, n_k, R)` (None when R = 0), residual a bias spec or None,
    info `{"rank", "bias_rel_error", "exact"}`."""
    factors, rest = [], []
    for term in bias.terms():
        f = term.exact_factors(mask, n_q, n_k)
        (rest.append(term) if f is None else factors.append(f))
    err, exact = 0.0, True
    if rest and (rank is not None or tol is not None):
        lr = lowrank(_sum(rest), n_q, n_k, rank=rank, tol=tol)
        factors.append((lr.bias.u, lr.bias.v))
        err, exact, rest = lr.rel_error, False, []
    if not factors:
        raise ValueError(f"bias {bias!r} has no exact low-rank form under mask {mask!r}; pass rank= or tol= "
                         "to method='lowrank_bias' for a truncated SVD (or use method='blocked')")
    U, V = concat_factors(factors)
    residual = _sum(rest) if rest else None
    return U, V, residual, {"rank": U.shape[-1], "bias_rel_error": err, "exact": exact and residual is None}


BAND_MIN_N = 2048  # the ALiBi band route pays off from about this length
BAND_LOG_EPS = {torch.float64: 40.0}  # dropped keys carry at most exp(-40) (float64) of a row's mass
BAND_LOG_EPS_DEFAULT = 20.0  # exp(-20) = 2e-9 for float32 work, 30x below its unit roundoff (6e-8)


def alibi_windows(slopes, q, k, scale: float, shape: Shape) -> list:
    """Per query head, the key window `w` beyond which causal ALiBi makes every key negligible, or None.

    Needs `N_q == N_k` (query i sits at key position i). Row i keeps its diagonal key, whose score is
    `d_i = scale q_i . k_i` (ALiBi adds 0 there), so the row's maximum is at least d_i; a key at distance
    `t > w` scores at most `scale |q_i| max_j |k_j| - s t` (Cauchy-Schwarz). With
    `A = max_i (scale |q_i| max|k| - d_i)` and `w = (A + ln N + E) / s`, all keys past w together carry at
    most `exp(-E)` of the row's mass (E = 20 for float32 work, 40 for float64): dropping them changes the
    result below the working precision's rounding."""
    sh = shape
    eps = BAND_LOG_EPS.get(torch.promote_types(q.dtype, torch.float32), BAND_LOG_EPS_DEFAULT)
    with torch.no_grad():
        s = slopes.detach().double().expand(sh.H)
        B, H, N, D = q.shape
        wd = torch.promote_types(q.dtype, torch.float32)
        qg = q.detach().to(wd).reshape(B, sh.H_kv, sh.groups, N, D)
        kd = k.detach().to(wd).unsqueeze(2)  # (B, H_kv, 1, N, D)
        kmax = torch.linalg.vector_norm(kd, dim=-1).amax(dim=(0, 2, 3)).double()  # (H_kv,)
        diag = torch.einsum("bhgnd,bhgnd->bhgn", qg, kd.expand_as(qg)).double() * scale
        qn = torch.linalg.vector_norm(qg, dim=-1).double()
        a = (scale * qn * kmax.view(1, -1, 1, 1) - diag).amax(dim=(0, 3)).reshape(sh.H)
        # float32 norms and dots are off by a few ulps; a margin of 1e-3 (relative and absolute) covers that
        # many times over (an error d in A only turns the mass bound exp(-E) into exp(-E + d)).
        a = a + 1e-3 * (scale * qn.amax(dim=(0, 3)).reshape(sh.H) * kmax.repeat_interleave(sh.groups) + 1)
        bound = a + math.log(sh.N_k) + eps
        w = torch.where(s > 0, bound / s.clamp_min(1e-300), torch.full_like(s, float("inf")))
    return [int(math.ceil(x)) if math.isfinite(x) and x < sh.N_k else None for x in w.tolist()]


def _chunk(w: int) -> int:
    return min(1024, max(128, -(-w // 64) * 64))


def band_groups(windows: list, N: int):
    """Split the heads into at most two band groups (each run with its largest window) and one full group,
    minimizing the keys visited per query: a band group costs `C + w` per head, a full head about N / 2."""
    band = sorted((w, h) for h, w in enumerate(windows) if w is not None)
    full_cost = N / 2
    overhead = 0.02 * full_cost  # per extra group: more, smaller kernel calls

    def cost(group):
        if not group:
            return 0.0
        w = group[-1][0]
        return len(group) * min(_chunk(w) + w, full_cost + 1e9 * (w >= N)) + overhead

    best = (len(band) * full_cost, 0, 0)
    n = len(band)
    for i in range(n + 1):          # band[:i] first group, band[i:j] second group, band[j:] full
        for j in range(i, n + 1):
            c = cost(band[:i]) + cost(band[i:j]) + (n - j) * full_cost
            if c < best[0]:
                best = (c, i, j)
    _, i, j = best
    groups = [([h for _, h in band[:i]], band[i - 1][0] if i else 0), ([h for _, h in band[i:j]], band[j - 1][0] if j > i else 0)]
    groups = [(hs, w) for hs, w in groups if hs]
    in_band = {h for hs, _ in groups for h in hs}
    return groups, [h for h in range(len(windows)) if h not in in_band]


def _band_group(qg, kg, vg, s, w: int, scale: float, work, return_lse: bool):
    """Causal ALiBi for heads `(B, Hg, N, D)` (slopes s `(Hg,)`) with keys limited to the window w: queries
    in chunks of C attend keys `[chunk start - w, chunk end)`; the bias enters as rank-2 factors in
    chunk-local coordinates (`-s (a + w - b) = [s, -s (a + w)] . [b, 1]`, magnitudes below `s (C + w)`)."""
    B, Hg, N, D = qg.shape
    Dv = vg.shape[-1]
    C = _chunk(w)
    P = min(N, -(-w // C) * C)  # leading chunks whose window reaches before position 0: one causal prefix
    W = -(-(D + 2) // 8) * 8
    dev = qg.device
    sv = s.view(Hg, 1)

    def cat(u, x):
        parts = [u, x]
        if W > u.shape[-1] + x.shape[-1]:
            parts.append(x.new_zeros(*x.shape[:-1], W - u.shape[-1] - x.shape[-1]))
        return torch.cat(parts, -1)

    pos = torch.arange(P, device=dev, dtype=work) - P // 2
    U = torch.stack([sv.expand(Hg, P), -sv * pos], -1).expand(B, Hg, P, 2)
    V = torch.stack([pos, torch.ones_like(pos)], -1).expand(B, Hg, P, 2)
    o, l = sdpa_attention(cat(U, qg[:, :, :P] * scale), cat(V, kg[:, :, :P]), vg[:, :, :P], None, True, 1.0,
                          Shape(B, Hg, Hg, P, P, W, Dv), return_lse)
    outs, lses = [o], [l]
    if P < N:
        n_rest = N - P
        nC = -(-n_rest // C)
        M = B * Hg * nC
        a = torch.arange(C, device=dev, dtype=work)
        b = torch.arange(C + w, device=dev, dtype=work)
        # Build the widened chunk tensors in place: one allocation each, no intermediate copies.
        qc = qg.new_zeros(B, Hg, nC * C, W)
        qc[:, :, :n_rest, 2:2 + D] = qg[:, :, P:]
        qc = qc.view(B, Hg, nC, C, W)
        qc[..., 2:2 + D] *= scale
        qc[..., 0] = sv.view(1, Hg, 1, 1)
        qc[..., 1] = (-sv * (a + w)).view(1, Hg, 1, C)
        kc = kg.new_zeros(B, Hg, nC, C + w, W)
        vc = vg.new_zeros(B, Hg, nC, C + w, W)
        for src, dst, width in ((kg, kc, D), (vg, vc, Dv)):
            win = src[:, :, P - w:].unfold(2, C + w, C).transpose(-1, -2)  # (B, Hg, n_win, C + w, width)
            n_win = min(win.shape[2], nC)
            off = 2 if dst is kc else 0
            dst[:, :, :n_win, :, off:off + width] = win[:, :, :n_win]
            for c in range(n_win, nC):  # the last chunks: window runs past the end (zeros stay masked)
                seg = src[:, :, P - w + c * C:]
                dst[:, :, c, :seg.shape[2], off:off + width] = seg
        kc[..., 0] = b
        kc[..., 1] = 1
        mask = b.view(1, -1) <= (a + w).view(-1, 1)  # causal in chunk-local coordinates
        o, l = sdpa_attention(qc.view(M, 1, C, W), kc.view(M, 1, C + w, W), vc.view(M, 1, C + w, W),
                              mask, False, 1.0, Shape(M, 1, 1, C, C + w, W, Dv), return_lse)
        outs.append(o.reshape(B, Hg, nC * C, Dv)[:, :, :n_rest])
        lses.append(l.reshape(B, Hg, nC * C)[:, :, :n_rest] if l is not None else None)
    return torch.cat(outs, 2), (torch.cat(lses, 2) if return_lse else None)


def alibi_band_attention(q, k, v, alibi, windows, scale: float, shape: Shape, return_lse: bool):
    """Causal ALiBi with `N_q == N_k`: head groups with a window (see `alibi_windows`, `band_groups`) take
    the chunked band route, the others the rank-2 route over all keys. Returns `(out, lse or None)`."""
    from ..biases import Alibi
    from ..masks import Causal
    sh = shape
    work = torch.promote_types(q.dtype, torch.float32)
    slopes = alibi.slopes.to(work).expand(sh.H)
    q, k, v = q.to(work), k.to(work), v.to(work)
    groups, full = band_groups(windows, sh.N_k)
    order, outs, lses = [], [], []
    for heads, w in groups + ([(full, None)] if full else []):
        idx = torch.tensor(heads, device=q.device)
        kv_idx = idx // sh.groups
        if sh.groups == 1 and heads == list(range(heads[0], heads[0] + len(heads))):  # a view, no copy
            qg, kg, vg = (x.narrow(1, heads[0], len(heads)) for x in (q, k, v))
        else:
            qg, kg, vg = q.index_select(1, idx), k.index_select(1, kv_idx), v.index_select(1, kv_idx)
        if w is None:
            n = len(heads)
            o, l = lowrank_bias_attention(qg, kg, vg, Causal(), Alibi(slopes.index_select(0, idx)), scale,
                                          Shape(sh.B, n, n, sh.N_q, sh.N_k, sh.D, sh.D_v), return_lse, band=False)
        else:
            o, l = _band_group(qg, kg, vg, slopes.index_select(0, idx), w, scale, work, return_lse)
        order += heads
        outs.append(o)
        lses.append(l)
    out = torch.cat(outs, 1)
    lse = torch.cat(lses, 1) if return_lse else None
    if order != list(range(sh.H)):
        inv = torch.empty(sh.H, dtype=torch.long)  # host: head permutation, moved below
        inv[torch.tensor(order)] = torch.arange(sh.H)  # host: head permutation
        inv = inv.to(q.device)
        out = out.index_select(1, inv)
        lse = lse.index_select(1, inv) if return_lse else None
    return out, lse


def _band_applies(bias, mask, q, shape: Shape) -> bool:
    from ..biases import Alibi
    from ..masks import Causal
    return (isinstance(bias, Alibi) and isinstance(mask, Causal) and shape.N_q == shape.N_k
            and shape.N_k >= BAND_MIN_N)


def lowrank_bias_attention(q, k, v, mask, bias, scale: float, shape: Shape, return_lse: bool, *,
                           rank=None, tol=None, engine: str = "auto", block_q: int = DEFAULT_BLOCK_Q,
                           block_k: int = DEFAULT_BLOCK_K, report: dict | None = None, band: bool = True):
    """q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(out (B, H, N_q, D_v), lse or
    None)`; see the module docstring."""
    sh = shape
    if band and engine != "blocked" and _band_applies(bias, mask, q, sh) and \
            (not return_lse or lse_supported(q.device, torch.promote_types(q.dtype, torch.float32))):
        windows = alibi_windows(bias.slopes, q, k, scale, sh)
        if band_groups(windows, sh.N_k)[0]:
            out, lse = alibi_band_attention(q, k, v, bias, windows, scale, sh, return_lse)
            if report is not None:
                report.clear()
                report.update({"rank": 2, "bias_rel_error": 0.0, "exact": True, "engine": "sdpa",
                               "alibi_windows": windows})
            return out.to(q.dtype), lse
    U, V, residual, info = factorize(bias, mask, sh.N_q, sh.N_k, rank, tol)
    work = torch.promote_types(torch.promote_types(q.dtype, torch.float32), U.dtype)
    R = U.shape[-1]
    W = -(-(sh.D + R) // 8) * 8
    H_kv = sh.H_kv
    if V.shape[1] > 1 and H_kv != sh.H:
        # Key-side factors differ per query head: give every query head its own key head.
        k = k.repeat_interleave(sh.groups, dim=1)
        v = v.repeat_interleave(sh.groups, dim=1)
        H_kv = sh.H
    U = U.to(work).expand(sh.B, sh.H, sh.N_q, R)
    V = V.to(work).expand(sh.B, H_kv, sh.N_k, R)
    # One allocation each: bias columns first (the kernel adds them before q.k), then q or k, then zeros.
    qc = q.new_zeros(sh.B, sh.H, sh.N_q, W, dtype=work)
    qc[..., R:R + sh.D] = q
    qc[..., R:R + sh.D] *= scale
    qc[..., :R] = U
    kc = k.new_zeros(sh.B, H_kv, sh.N_k, W, dtype=work)
    kc[..., R:R + sh.D] = k
    kc[..., :R] = V
    v = v.to(work)
    cshape = Shape(sh.B, sh.H, H_kv, sh.N_q, sh.N_k, W, sh.D_v)
    attn_mask, is_causal, reason = lower(mask, residual, cshape, check_only=engine == "blocked")
    if reason is None and return_lse and residual is not None and any(t.requires_grad for t in residual.tensors()):
        reason = "the CPU flash op behind return_lse=True gives no gradient to the residual (materialized) bias"
    if engine == "auto":
        engine = "sdpa" if reason is None and (not return_lse or lse_supported(q.device, work)) else "blocked"
    elif engine == "sdpa" and reason is not None:
        raise ValueError(f"engine='sdpa' cannot run this request: {reason}")
    if engine == "sdpa":
        out, lse = sdpa_attention(qc, kc, v, attn_mask, is_causal, 1.0, cshape, return_lse)
    else:
        out, lse = blocked_attention(qc, kc, v, mask, residual, 1.0, cshape, block_q, block_k)
    info["engine"] = engine
    if report is not None:
        report.clear()
        report.update(info)
    return out.to(q.dtype), (lse if return_lse else None)


def _supports(req: Request):
    if req.bias is None:
        return "no bias to factor (use sdpa)"
    return None


def _run(req: Request, rank=None, tol=None, engine="auto", block_q=DEFAULT_BLOCK_Q, block_k=DEFAULT_BLOCK_K,
         report=None, band=True):
    if rank is not None:
        check_positive_int("rank", rank)
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1):
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    if rank is not None and tol is not None:
        raise ValueError(f"give rank= or tol=, not both (got rank={rank}, tol={tol})")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    if report is not None and not isinstance(report, dict):
        raise TypeError(f"report must be a dict (filled with rank and bias_rel_error), got {type(report).__name__}")
    if not isinstance(band, bool):
        raise TypeError(f"band must be a bool, got {type(band).__name__}")
    return lowrank_bias_attention(req.q, req.k, req.v, req.mask, req.bias, req.scale, req.shape, req.return_lse,
                                  rank=rank, tol=tol, engine=engine, block_q=block_q, block_k=block_k, report=report,
                                  band=band)


register(Method(
    "lowrank_bias", True,
    "FlashBias: bias = U V^T folded into [q*scale, U].[k, V] through SDPA or blocked (exact for causal "
    "ALiBi, SpatialDistance, Factored; truncated SVD with rank=/tol= otherwise, error in report=)",
    _supports, _run,
    {"rank": "truncated-SVD rank for biases without an exact low-rank form",
     "tol": "relative Frobenius error for the truncated SVD (smallest rank reaching it)",
     "report": "a dict filled with {'rank', 'bias_rel_error', 'exact', 'engine'}",
     "engine": "'auto' (SDPA when the mask has an SDPA form), 'sdpa' or 'blocked'",
     "band": "causal ALiBi, N >= 2048: skip keys whose weight is provably below exp(-40) (default True)",
     "block_q": f"blocked engine query tile (default {DEFAULT_BLOCK_Q})",
     "block_k": f"blocked engine key tile (default {DEFAULT_BLOCK_K})"}))
