"""`performer`: FAVOR+ attention with positive orthogonal random features.

Choromanski et al., 2021, "Rethinking Attention with Performers" (ICLR). With `W (m, D)` orthogonal
Gaussian rows (`anyattn.linear.feature_maps.orthogonal_gaussian`) and
`phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)` (`anyattn.linear.feature_maps.performer_features`, the same
map the linear-attention family uses), `E[phi(q) . phi(k)] = exp(q . k)`. Inputs are multiplied by
`sqrt(scale)` so the estimate is of `exp(scale q . k)`; then

    out_i = phi(q_i)^T sum_j phi(k_j) v_j^T / phi(q_i)^T sum_j phi(k_j)

in O(N m (D + D_v)) time. Causal (bottom-right aligned) runs chunked prefix sums over key chunks of
`chunk_size`; KeyPadding zeroes padded keys' features. Other masks and biases are refused.

Numerics: the features are stabilized as in the reference implementation — each query row's logits
`W x - |x|^2/2` are shifted by their max, keys by their per-head max; both shifts cancel in the ratio
and are added back to the returned (approximate) LSE `log(phi(q_i) . sum_j phi(k_j)) + shifts`.

Shapes: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(B, H, N_q, D_v)`.
"""
from __future__ import annotations

import math

import torch

from ..linear.feature_maps import orthogonal_gaussian, performer_features
from ..lse import NEG_INF
from ..registry import Method, Request, register
from ._common import SEED_DOC, causal_offset, expand_kv, finish, generator, key_lengths, pad_to, positive_int, screen

DEFAULT_NUM_FEATURES = 256
DEFAULT_CHUNK = 128

__all__ = ["projection", "favor_features", "performer_attention", "performer_features"]


def projection(d: int, num_features: int, seed=0, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The `(num_features, d)` orthogonal Gaussian projection FAVOR+ uses, drawn from `seed`."""
    return orthogonal_gaussian(num_features, d, generator(seed), dtype=dtype, device=device)


def favor_features(x: torch.Tensor, w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilized `performer_features`: returns `(phi, shift)` with `phi * exp(shift) ==
    performer_features(x, w)`. `per_row`: shift each row by its max (queries), else by the max over
    the last two dims (keys, per head). x `(..., N, d)`, w `(m, d)` -> phi `(..., N, m)`, shift
    `(..., N, 1)` or `(..., 1, 1)`. Four passes over the `(N, m)` logits (matmul, max, subtract, exp)."""
    xw = x @ w.T
    half = 0.5 * (x * x).sum(-1, keepdim=True)
    with torch.no_grad():
        rmax = xw.amax(-1, keepdim=True)
        rmax = torch.where(torch.isfinite(rmax), rmax, torch.zeros_like(rmax))
        if per_row:
            shift = rmax - half  # max over features of (x w - |x|^2 / 2)
        else:
            shift = (rmax - half).amax(-2, keepdim=True)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    # phi = exp(x w - |x|^2/2 - shift); the 1/sqrt(m) of performer_features goes into the returned shift
    phi = xw.sub_(half + shift).exp_()
    return phi, shift - 0.5 * math.log(w.shape[0])


def favor_qk(q, k, scale: float, w: torch.Tensor, lengths: torch.Tensor | None = None):
    """Stabilized FAVOR+ features of q (per-row shift) and k (per-head shift) for softmax with
    `scale`, key padding applied (features of keys at or past `lengths[b]` are zero).
    Returns `(fq, sq, fk, sk)` as `favor_features`."""
    r = math.sqrt(scale)
    fq, sq = favor_features(q * r, w, per_row=True)
    fk, sk = favor_features(k * r, w, per_row=False)
    if lengths is not None:
        B, N_k = k.shape[0], k.shape[2]
        keep = torch.arange(N_k, device=k.device).view(1, -1) < lengths.view(-1, 1)
        fk = fk * keep.view(B, 1, N_k, 1).to(fk.dtype)
    return fq, sq, fk, sk


def _noncausal(fq, fk, vv):
    kv = fk.transpose(-1, -2) @ vv  # (B, H, m, D_v + 1)
    return fq @ kv


def _causal_square(fq, fk, vv, chunk: int):
    """Inclusive prefix sums for N_q == N_k: chunk-level states plus a masked intra-chunk part."""
    B, H, N, m = fq.shape
    n = -(-N // chunk) * chunk
    nc = n // chunk
    fq_c = pad_to(fq, n, 2).reshape(B, H, nc, chunk, m)
    fk_c = pad_to(fk, n, 2).reshape(B, H, nc, chunk, m)
    vv_c = pad_to(vv, n, 2).reshape(B, H, nc, chunk, vv.shape[-1])
    states = fk_c.transpose(-1, -2) @ vv_c  # (B, H, nc, m, D_v + 1)
    prefix = torch.cumsum(states, dim=2) - states
    inter = fq_c @ prefix
    a = fq_c @ fk_c.transpose(-1, -2)
    tril = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    intra = a.masked_fill(~tril, 0.0) @ vv_c
    return (inter + intra).reshape(B, H, n, -1)[:, :, :N]


def _causal(fq, fk, vv, o: int, chunk: int):
    """Query i sees keys `j <= i + o`. Queries with `0 <= i + o < N_k - 1` sit in the slots of a square
    causal prefix sum; those with `i + o >= N_k - 1` see every key; those with `i + o < 0` see none."""
    B, H, N_q, m = fq.shape
    N_k = fk.shape[2]
    lo, hi = min(N_q, max(0, -o)), max(min(N_q, max(0, -o)), min(N_q, N_k - 1 - o))
    parts = [vv.new_zeros(B, H, lo, vv.shape[-1])]
    if hi > lo:
        slots = torch.cat([fq.new_zeros(B, H, lo + o, m), fq[:, :, lo:hi],
                           fq.new_zeros(B, H, N_k - (hi + o), m)], 2)
        parts.append(_causal_square(slots, fk, vv, chunk)[:, :, lo + o:hi + o])
    if hi < N_q:
        parts.append(_noncausal(fq[:, :, hi:], fk, vv))
    return torch.cat(parts, 2)


def performer_attention(q, k, v, scale: float, w: torch.Tensor, *, causal_offset: int | None = None,
                        lengths: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK):
    """FAVOR+ on expanded heads. q `(B, H, N_q, D)`, k, v with H heads, w `(m, D)` the projection.
    causal_offset: query i sees keys `j <= i + offset` (None: non-causal); lengths `(B,)`: key padding.
    Returns `(out (B, H, N_q, D_v), lse (B, H, N_q))`, the LSE approximate."""
    B, H, N_q, _ = q.shape
    fq, sq, fk, sk = favor_qk(q, k, scale, w, lengths)
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)
    if causal_offset is None:
        num = _noncausal(fq, fk, vv)
    else:
        num = _causal(fq, fk, vv, causal_offset, chunk_size)
    den = num[..., -1]
    # features are >= 0: where den == 0 the numerator is 0 as well, so out is 0 there and its LSE -inf
    out = num[..., :-1] / den.clamp_min(torch.finfo(den.dtype).tiny).unsqueeze(-1)
    lse = torch.where(den > 0, torch.log(den.clamp_min(torch.finfo(den.dtype).tiny)) + sq.squeeze(-1)
                      + sk.reshape(B, H, 1), torch.full_like(den, NEG_INF))
    return out, lse


def _supports(req: Request):
    return screen(req, "performer", causal=True, key_padding=True)


def _run(req: Request, num_features: int = DEFAULT_NUM_FEATURES, seed=0, chunk_size: int = DEFAULT_CHUNK):
    positive_int("num_features", num_features)
    positive_int("chunk_size", chunk_size)
    q, k, v = expand_kv(req)
    w = projection(req.shape.D, num_features, seed, dtype=q.dtype, device=q.device)
    off = causal_offset(req.mask, req.shape.N_q, req.shape.N_k)
    out, lse = performer_attention(q, k, v, req.scale, w, causal_offset=off,
                                   lengths=key_lengths(req.mask, req.shape.B, req.shape.N_k, q.device),
                                   chunk_size=chunk_size)
    return finish(out, lse, req)


OPTIONS = {
    "num_features": f"random features m (default {DEFAULT_NUM_FEATURES}); error falls roughly as 1/sqrt(m)",
    "seed": SEED_DOC,
    "chunk_size": f"key chunk of the causal prefix sums (default {DEFAULT_CHUNK})",
}

register(Method("performer", False, "FAVOR+ positive orthogonal random features (Choromanski et al. 2021); "
                "O(N m D); causal by chunked prefix sums; KeyPadding; approximate LSE",
                _supports, _run, OPTIONS))
