"""`kernel_rpe`: kernelized attention with a relative-position bias through FFT Toeplitz products.

Luo et al., 2021, "Stable, Fast and Accurate: Kernelized Attention with Relative Positional
Encoding" (NeurIPS). With the FAVOR+ positive random features `phi` of `performer` (same projection,
same `seed`) estimating `exp(scale q . k)`, and a relative-position bias `b` giving `c = exp(b)`:

    out_i = phi(q_i)^T sum_j c_{r(i,j)} phi(k_j) [v_j, 1]^T, normalized by the last column,

which estimates `softmax(scale q k^T + b_{r(i,j)}) v`. The sum over j is a Toeplitz matrix-vector
product for every (feature, value) column, computed by FFT on a circulant of length >= N_q + N_k - 1:
O(N m D_v log N) time, processed `feature_chunk` features at a time to bound memory (default: as many as
keep one pass under `CHUNK_ELEMENTS` elements).

The bias is the option `rpe`: a float tensor `(N_q + N_k - 1,)` or `(H, N_q + N_k - 1)` (one table per
query head); `rpe[..., t]` is added for the pairs with relative position `j - (i + N_k - N_q) =
t - (N_k - 1)` (bottom-right aligned; for N_q == N_k entry `N - 1 + d` is the bias of `j - i = d`).
Gradients flow to `rpe`. Without `rpe` the bias is 0 (plain FAVOR+ computed through the Toeplitz path).
Causal (either alignment) zeroes `c` beyond the diagonal; KeyPadding zeroes padded keys; other masks and
`bias=` are refused (pass the relative-position table as `rpe=`). Returns an approximate LSE.

Shapes: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(B, H, N_q, D_v)`.
"""
from __future__ import annotations

import torch

from ..lse import NEG_INF
from ..masks import Causal
from ..registry import Method, Request, register
from ._common import SEED_DOC, expand_kv, finish, key_lengths, positive_int, screen
from .performer import favor_qk, projection

DEFAULT_NUM_FEATURES = 64
CHUNK_ELEMENTS = 1 << 25  # auto feature_chunk: at most this many elements per FFT pass


def check_rpe(rpe, H: int, n_q: int, n_k: int, device, dtype=None) -> torch.Tensor:
    """Validate `rpe` and return it as `(H|1, N_q + N_k - 1)`."""
    L = n_q + n_k - 1
    if not isinstance(rpe, torch.Tensor):
        raise TypeError(f"rpe must be a torch.Tensor, got {type(rpe).__name__}")
    if not rpe.dtype.is_floating_point:
        raise TypeError(f"rpe must be a floating tensor, got {rpe.dtype}")
    if rpe.dim() == 1:
        rpe = rpe.unsqueeze(0)
    if rpe.dim() != 2 or rpe.shape[0] not in (1, H) or rpe.shape[1] != L:
        raise ValueError(f"rpe must have shape (N_q + N_k - 1,) = ({L},) or (H, N_q + N_k - 1) = ({H}, {L}), "
                         f"got {tuple(rpe.shape)}")
    if rpe.device != device:
        raise ValueError(f"rpe must be on the inputs' device {device}, got {rpe.device}")
    if torch.isnan(rpe).any():
        raise ValueError("rpe contains NaN")
    return rpe


def toeplitz_apply(h: torch.Tensor, y: torch.Tensor, n_q: int) -> torch.Tensor:
    """`T[..., i, :] = sum_j h[..., j - i + n_q - 1] y[..., j, :]` for i < n_q, j < N_k, by FFT along dim -2.
    h `(..., n_q + N_k - 1)`, y `(..., N_k, C)` (leading dims broadcast) -> `(..., n_q, C)`.
    The Toeplitz product is a circular convolution of length L >= n_q + N_k - 1 with the kernel
    `r[n] = h[n_q - 1 - n]` (n < n_q), `r[L - n] = h[n_q - 1 + n]` (0 < n < N_k), zero elsewhere."""
    n_k = y.shape[-2]
    L = 1 << (n_q + n_k - 2).bit_length()
    r = torch.cat([torch.flip(h[..., :n_q], (-1,)), h.new_zeros(h.shape[:-1] + (L - n_q - n_k + 1,)),
                   torch.flip(h[..., n_q:], (-1,))], -1)
    rf = torch.fft.rfft(r, n=L).unsqueeze(-1)
    yf = torch.fft.rfft(y, n=L, dim=-2)
    yf = yf * rf if torch.is_grad_enabled() else yf.mul_(rf)
    return torch.fft.irfft(yf, n=L, dim=-2)[..., :n_q, :]


def kernel_rpe_attention(q, k, v, scale: float, w: torch.Tensor, rpe: torch.Tensor | None = None, *,
                         causal_offset: int | None = None, lengths: torch.Tensor | None = None,
                         feature_chunk: int | None = None):
    """Kernelized RPE attention on expanded heads. rpe `(H|1, N_q + N_k - 1)` or None. Returns `(out, lse)`."""
    B, H, N_q, _ = q.shape
    N_k, D_v = k.shape[2], v.shape[-1]
    m = w.shape[0]
    L = N_q + N_k - 1
    fq, sq, fk, sk = favor_qk(q, k, scale, w, lengths)
    b = torch.zeros(1, L, dtype=q.dtype, device=q.device) if rpe is None else rpe.to(q.dtype)
    if causal_offset is not None:
        t = torch.arange(L, device=q.device)
        b = b.masked_fill(t > causal_offset + N_q - 1, NEG_INF)
    bmax = b.detach().amax(-1, keepdim=True)
    bmax = torch.where(torch.isfinite(bmax), bmax, torch.zeros_like(bmax))
    c = torch.exp(b - bmax).unsqueeze(0)  # (1, H|1, L)
    vv = torch.cat([v, torch.ones_like(v[..., :1])], -1)  # (B, H, N_k, D_v + 1)
    if feature_chunk is None:
        feature_chunk = max(1, min(m, CHUNK_ELEMENTS // max(1, B * H * (N_q + N_k) * (D_v + 1))))
    num = None
    for f0 in range(0, m, feature_chunk):
        f1 = min(m, f0 + feature_chunk)
        y = fk[..., f0:f1].unsqueeze(-1) * vv.unsqueeze(-2)  # (B, H, N_k, F, D_v + 1)
        t = toeplitz_apply(c, y.reshape(B, H, N_k, -1), N_q).reshape(B, H, N_q, f1 - f0, D_v + 1)
        part = (fq[..., f0:f1].unsqueeze(-1) * t).sum(-2)
        num = part if num is None else num + part
    den = num[..., -1]
    # FFT round-off leaves ~1e-17 instead of exact zeros: rows with no allowed key (causal rows before
    # the first key, zero-length key padding) are zeroed structurally, the rest need den > 0.
    ok = den > 0
    if causal_offset is not None:
        ok = ok & (torch.arange(N_q, device=q.device) + causal_offset >= 0).view(1, 1, N_q)
    if lengths is not None:
        ok = ok & (lengths > 0).view(B, 1, 1)
    safe = torch.where(ok, den, torch.ones_like(den))
    out = torch.where(ok.unsqueeze(-1), num[..., :-1] / safe.unsqueeze(-1), torch.zeros_like(num[..., :-1]))
    lse = torch.where(ok, torch.log(safe) + sq.squeeze(-1) + sk.reshape(B, H, 1) + bmax.view(1, -1, 1),
                      torch.full_like(den, NEG_INF))
    return out, lse


def _supports(req: Request):
    reason = screen(req, "kernel_rpe", causal=True, key_padding=True)
    if reason is not None and req.bias is not None:
        reason += "; pass a relative-position table as rpe= instead"
    return reason


def _run(req: Request, rpe=None, num_features: int = DEFAULT_NUM_FEATURES, seed=0,
         feature_chunk: int | None = None):
    sh = req.shape
    positive_int("num_features", num_features)
    if feature_chunk is not None:
        positive_int("feature_chunk", feature_chunk)
    if rpe is not None:
        rpe = check_rpe(rpe, sh.H, sh.N_q, sh.N_k, req.q.device)
    q, k, v = expand_kv(req)
    w = projection(sh.D, num_features, seed, dtype=q.dtype, device=q.device)
    off = req.mask.offset(sh.N_q, sh.N_k) if isinstance(req.mask, Causal) else None
    out, lse = kernel_rpe_attention(q, k, v, req.scale, w, rpe, causal_offset=off,
                                    lengths=key_lengths(req.mask, sh.B, sh.N_k, q.device),
                                    feature_chunk=feature_chunk)
    return finish(out, lse, req)


OPTIONS = {
    "rpe": "relative-position bias table (N_q + N_k - 1,) or (H, N_q + N_k - 1); index N_k - 1 + (j - i') "
           "with i' = i + N_k - N_q (default None: no bias)",
    "num_features": f"random features m (default {DEFAULT_NUM_FEATURES})",
    "seed": SEED_DOC,
    "feature_chunk": "features per FFT pass; bounds memory to O(B H N feature_chunk D_v) (default None: "
                     f"as many as keep one pass under {CHUNK_ELEMENTS} elements)",
}

register(Method("kernel_rpe", False, "kernelized attention with relative-position bias (Luo et al. 2021): "
                "FAVOR+ features, Toeplitz products by FFT; causal; KeyPadding; approximate LSE",
                _supports, _run, OPTIONS))
