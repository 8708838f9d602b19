"""Long convolutions by FFT in O(L log L), with the kernel regularizers of Fu et al., "Simple
Hardware-Efficient Long Convolutions for Sequence Modeling" (2023): squash (soft-threshold the kernel,
`sign(k) relu(|k| - lambda)`, which sparsifies it) and smooth (average pooling along the kernel).

Causal: `y[b, d, t] = sum_{s=0}^{L_k-1} kernel[d, s] u[b, d, t - s] (+ D[d] u[b, d, t])`.
Bidirectional (as in the paper's code): kernel `(2, D, L_k)`, `kernel[0]` the causal taps as above and
`kernel[1]` the anti-causal ones, `y_t += sum_{i=0}^{L_k-1} kernel[1, d, i] u_{t+1+i}`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_float, check_positive_int, check_shape, check_tensor, compute_dtype

__all__ = ["long_conv", "fft_conv", "squash_kernel", "smooth_kernel"]


def squash_kernel(kernel: torch.Tensor, lam: float) -> torch.Tensor:
    """Soft-threshold: `sign(k) * relu(|k| - lam)` (the "squash" regularizer)."""
    check_tensor("kernel", kernel)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
        raise ValueError(f"lam must be a non-negative float, got {lam!r}")
    return torch.sign(kernel) * F.relu(kernel.abs() - lam)


def smooth_kernel(kernel: torch.Tensor, width: int) -> torch.Tensor:
    """Average pooling of odd or even `width` along the last (kernel) axis, stride 1, same length
    (zero padding, `count_include_pad=False` so the ends are averages of the taps that exist)."""
    check_tensor("kernel", kernel)
    check_positive_int("width", width)
    if width == 1:
        return kernel
    shape = kernel.shape
    k = kernel.reshape(-1, 1, shape[-1])
    left = (width - 1) // 2
    pad = (left, width - 1 - left)
    num = F.avg_pool1d(F.pad(k, pad), width, stride=1)
    den = F.avg_pool1d(F.pad(torch.ones_like(k[:1]), pad), width, stride=1)
    return (num / den).reshape(shape)


def _fft_size(n: int) -> int:
    """A fast FFT length >= n (a power of two, or 3 * a power of two when that is smaller)."""
    p = 1 << max(0, (n - 1).bit_length())
    q = 3 * (p // 4)
    return q if q >= n else p


def fft_conv(u: torch.Tensor, kernel: torch.Tensor, n_fft: int | None = None) -> torch.Tensor:
    """Linear (non-circular) causal convolution along the last axis by rfft: u `(..., D, L)`,
    kernel `(D, L_k)`; returns `(..., D, L)`, `y_t = sum_s kernel_s u_{t-s}`."""
    L = u.shape[-1]
    Lk = kernel.shape[-1]
    n = n_fft or _fft_size(L + Lk - 1)
    uf = torch.fft.rfft(u, n=n)
    kf = torch.fft.rfft(kernel, n=n)
    return torch.fft.irfft(uf * kf, n=n)[..., :L]


def long_conv(u, kernel, D=None, bidirectional: bool = False, *, squash: float | None = None,
              smooth: int | None = None):
    """FFT long convolution, O(L log L).

    u `(B, D, L)`; kernel `(D, L_k)` with `L_k <= L` (causal) or `(2, D, L_k)` (bidirectional: forward
    and backward taps); D `(D,)` skip term. `squash=lambda` soft-thresholds the kernel and `smooth=w`
    average-pools it (width w) before use (Fu et al. 2023). Returns y `(B, D, L)` in u's dtype
    (computed in fp32, or fp64 for fp64 inputs).
    """
    check_tensor("u", u, 3)
    check_float("u", u)
    Bsz, Dm, L = u.shape
    if Bsz == 0 or Dm == 0 or L == 0:
        raise ValueError(f"u must be non-empty (B, D, L), got shape {tuple(u.shape)}")
    check_tensor("kernel", kernel)
    check_float("kernel", kernel, u)
    if not isinstance(bidirectional, bool):
        raise TypeError(f"bidirectional must be a bool, got {type(bidirectional).__name__}")
    if bidirectional:
        if kernel.dim() != 3 or kernel.shape[0] != 2 or kernel.shape[1] != Dm:
            raise ValueError(f"kernel must have shape (2, D, L_k) with D = {Dm} when bidirectional, "
                             f"got {tuple(kernel.shape)}")
    elif kernel.dim() != 2 or kernel.shape[0] != Dm:
        raise ValueError(f"kernel must have shape (D, L_k) with D = {Dm}, got {tuple(kernel.shape)}")
    Lk = kernel.shape[-1]
    if Lk == 0 or Lk > L:
        raise ValueError(f"kernel length L_k must be in [1, L] with L = {L} (u's length), got {Lk}")
    if D is not None:
        check_float("D", D, u)
        check_shape("D", D, (Dm,), "(D,)")
    cd = compute_dtype(u, kernel, D)
    k = kernel.to(cd)
    if squash is not None:
        k = squash_kernel(k, squash)
    if smooth is not None:
        k = smooth_kernel(k, smooth)
    uc = u.to(cd)
    if bidirectional:
        # one circular convolution of length n >= L + L_k: causal taps at lags 0..L_k-1, anti-causal
        # taps at lags -1..-L_k (positions n-1..n-L_k), nothing wraps into [0, L).
        n = _fft_size(L + Lk)
        full = torch.zeros(Dm, n, dtype=cd, device=u.device)
        full = full.index_add(1, torch.arange(Lk, device=u.device), k[0])
        full = full.index_add(1, n - 1 - torch.arange(Lk, device=u.device), k[1])
        y = torch.fft.irfft(torch.fft.rfft(uc, n=n) * torch.fft.rfft(full, n=n), n=n)[..., :L]
    else:
        y = fft_conv(uc, k)
    if D is not None:
        y = y + D.to(cd)[:, None] * uc
    return y.to(u.dtype)
