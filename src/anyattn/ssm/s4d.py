"""S4D (Gu, Gupta, Goel, Ré, "On the Parameterization and Initialization of Diagonal State Space
Models", 2022): a diagonal complex SSM per channel, discretized by zero-order hold,

    Abar = exp(dt A),  Bbar = (exp(dt A) - 1) / A * B,
    K_l  = 2 Re( sum_n C_n Bbar_n Abar_n^l )     (N modes, each standing for a conjugate pair)

and applied as a causal long convolution `y = K * u + D u` by FFT (`long_conv`); decoding runs the
recurrence `x_t = Abar x_{t-1} + Bbar u_t`, `y_t = 2 Re(C . x_t) + D u_t` (`s4d_step`).
"""
from __future__ import annotations

import math

import torch

from ._checks import check_float, check_positive_int, check_shape, check_tensor, compute_dtype
from .long_conv import long_conv

__all__ = ["s4d_kernel", "s4d", "s4d_lin_init", "s4d_inv_init"]


def _complex_of(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def s4d_lin_init(H: int, N: int, dtype=torch.complex64, device=None) -> torch.Tensor:
    """S4D-Lin: `A_n = -1/2 + i pi n`, n = 0..N-1, the same for each of the H channels. `(H, N)` complex."""
    check_positive_int("H", H)
    check_positive_int("N", N)
    n = torch.arange(N, dtype=torch.float64)  # host: float64 init, moved below
    A = torch.complex(torch.full_like(n, -0.5), math.pi * n)
    return A.expand(H, N).to(dtype=dtype, device=device).contiguous()


def s4d_inv_init(H: int, N: int, dtype=torch.complex64, device=None) -> torch.Tensor:
    """S4D-Inv: `A_n = -1/2 + i (N / pi) (N / (2n + 1) - 1)`, n = 0..N-1. `(H, N)` complex."""
    check_positive_int("H", H)
    check_positive_int("N", N)
    n = torch.arange(N, dtype=torch.float64)  # host: float64 init, moved below
    A = torch.complex(torch.full_like(n, -0.5), (N / math.pi) * (N / (2 * n + 1) - 1))
    return A.expand(H, N).to(dtype=dtype, device=device).contiguous()


def _check_params(log_dt, A, B, C):
    check_tensor("log_dt", log_dt, 1)
    check_float("log_dt", log_dt)
    H = log_dt.shape[0]
    check_tensor("A", A, 2)
    check_float("A", A, log_dt, allow_complex=True)
    if A.shape[0] != H or A.shape[1] == 0:
        raise ValueError(f"A must have shape (H, N) with H = {H} (log_dt's length), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X)
        check_float(name, X, log_dt, allow_complex=True)
        check_shape(name, X, (H, N), "(H, N)")
    return H, N


def s4d_kernel(log_dt, A, B, C, L: int, *, block: int = 4096) -> torch.Tensor:
    """The S4D convolution kernel `K (H, L)`, `K_l = 2 Re(sum_n C_n B_n (exp(dt A_n) - 1) / A_n exp(l dt A_n))`.

    log_dt `(H,)` real (dt = exp(log_dt)); A, B, C `(H, N)` complex (real tensors are promoted).
    Real fp32 (fp64 if any input is fp64 / complex128). Built in blocks of `block` positions
    (memory `O(H N block)`)."""
    H, N = _check_params(log_dt, A, B, C)
    check_positive_int("L", L)
    cd = compute_dtype(log_dt, A, B, C)
    ct = _complex_of(cd)
    A, B, C = A.to(ct), B.to(ct), C.to(ct)
    dtA = torch.exp(log_dt.to(cd)).unsqueeze(-1) * A                 # (H, N)
    W = C * B * (torch.exp(dtA) - 1) / A                              # (H, N)
    out = []
    for l0 in range(0, L, block):
        pos = torch.arange(l0, min(L, l0 + block), dtype=cd, device=log_dt.device)
        V = torch.exp(dtA.unsqueeze(-1) * pos)                        # (H, N, blk)
        out.append(2 * torch.einsum("hn,hnl->hl", W, V).real)
    return torch.cat(out, -1)


def s4d(u, log_dt, A, B, C, D=None, *, initial_state=None, output_final_state: bool = False):
    """S4D op: `y = s4d_kernel(...) * u + D u` by FFT, plus the decayed initial state if one is given.

    u `(B, H, L)` real; initial_state `(B, H, N)` complex (as `s4d_step`'s). Returns y `(B, H, L)` in u's
    dtype, or `(y, final_state (B, H, N) complex64/complex128)` if `output_final_state`."""
    check_tensor("u", u, 3)
    check_float("u", u)
    H, N = _check_params(log_dt, A, B, C)
    if u.shape[1] != H:
        raise ValueError(f"u must have shape (B, H, L) with H = {H} (log_dt's length), got {tuple(u.shape)}")
    if log_dt.device != u.device:
        raise ValueError(f"log_dt must be on the same device as u ({u.device}), got {log_dt.device}")
    Bsz, _, L = u.shape
    if initial_state is not None:
        check_float("initial_state", initial_state, u, allow_complex=True)
        check_shape("initial_state", initial_state, (Bsz, H, N), "(B, H, N)")
    y = long_conv(u, s4d_kernel(log_dt, A, B, C, L), D)
    if initial_state is None and not output_final_state:
        return y
    cd = compute_dtype(u, log_dt, A, B, C)
    ct = _complex_of(cd)
    Ac, Bc, Cc = A.to(ct), B.to(ct), C.to(ct)
    dtA = torch.exp(log_dt.to(cd)).unsqueeze(-1) * Ac                     # (H, N)
    pos = torch.arange(L, dtype=cd, device=u.device)
    V = torch.exp(dtA.unsqueeze(-1) * pos)                                # (H, N, L): Abar^l
    Abar = torch.exp(dtA)
    Bbar = (Abar - 1) / Ac * Bc
    if initial_state is not None:
        x0 = initial_state.to(ct)                                         # y_t += 2 Re(C Abar^(t+1) x0)
        y = y + (2 * torch.einsum("hn,hnl,bhn->bhl", Cc * Abar, V, x0).real).to(y.dtype)
    if not output_final_state:
        return y
    last = Bbar * torch.einsum("hnl,bhl->bhn", V.flip(-1), u.to(ct))      # sum_s Abar^(L-1-s) Bbar u_s
    if initial_state is not None:
        last = last + Abar * V[..., -1] * x0
    return y, last
