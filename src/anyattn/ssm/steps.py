"""One-token decoding steps of the SSM family (Mamba's selective scan, Mamba-2's SSD, S4D, long
convolutions), with their argument checks. States are kept in fp32 (fp64 for fp64 inputs) whatever the
input precision; outputs come back in the input dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..linear import retention_step
from ._checks import check_float, check_shape, check_tensor, compute_dtype
from .recurrent import _ss_step_core, s4d_discretize
from .ssd import _finish_ssd, _prepare_ssd

__all__ = ["selective_scan_step", "ssd_step", "s4d_step", "LongConvState", "long_conv_step"]


def selective_scan_step(state, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """One token of `selective_scan` (as mamba_ssm's `selective_state_update`, but functional).

    state `(B, D, N)` (None: zeros), u/delta/z `(B, D)`, A `(D, N)`, B/C `(B, N)` or `(B, G, N)`,
    D/delta_bias `(D,)`. Returns `(y (B, D) in u's dtype, new_state (B, D, N) fp32/fp64)`."""
    check_tensor("u", u, 2)
    check_float("u", u)
    Bsz, Dm = u.shape
    check_float("delta", delta, u)
    check_shape("delta", delta, (Bsz, Dm), "(B, D)")
    check_tensor("A", A, 2)
    check_float("A", A, u)
    if A.shape[0] != Dm:
        raise ValueError(f"A must have shape (D, N) with D = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    Bg, Cg = [], []
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X)
        check_float(name, X, u)
        if X.dim() == 2:
            check_shape(name, X, (Bsz, N), "(B, N)")
            X = X.unsqueeze(1)
        elif X.dim() == 3:
            if X.shape[0] != Bsz or X.shape[2] != N or X.shape[1] == 0 or Dm % X.shape[1] != 0:
                raise ValueError(f"{name} must have shape (B, N) = {(Bsz, N)} or (B, G, N) with D = {Dm} "
                                 f"divisible by G, got {tuple(X.shape)}")
        else:
            raise ValueError(f"{name} must have shape (B, N) or (B, G, N), got shape {tuple(X.shape)}")
        (Bg if name == "B" else Cg).append(X)
    Bg, Cg = Bg[0], Cg[0]
    if Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"B and C must have the same number of groups, got B: {Bg.shape[1]}, C: {Cg.shape[1]}")
    G = Bg.shape[1]
    cd = compute_dtype(u, delta, A, B, C, state)
    if state is None:
        x = torch.zeros(Bsz, Dm, N, dtype=cd, device=u.device)
    else:
        check_float("state", state, u)
        check_shape("state", state, (Bsz, Dm, N), "(B, D, N)")
        x = state.to(cd)
    dt = delta.to(cd)
    if delta_bias is not None:
        check_float("delta_bias", delta_bias, u)
        check_shape("delta_bias", delta_bias, (Dm,), "(D,)")
        dt = dt + delta_bias.to(cd)
    if delta_softplus:
        dt = F.softplus(dt)
    Dg = Dm // G
    xg, y = _ss_step_core(x.view(Bsz, G, Dg, N), u.to(cd).view(Bsz, G, Dg), dt.view(Bsz, G, Dg),
                          A.to(cd).view(G, Dg, N), Bg.to(cd), Cg.to(cd))
    y = y.reshape(Bsz, Dm)
    if D is not None:
        check_float("D", D, u)
        check_shape("D", D, (Dm,), "(D,)")
        y = y + D.to(cd) * u.to(cd)
    if z is not None:
        check_float("z", z, u)
        check_shape("z", z, (Bsz, Dm), "(B, D)")
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), xg.reshape(Bsz, Dm, N)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token of `ssd`, through `anyattn.linear.retention_step` (q = C, k = B, v = x dt, g = dt A).

    state `(B, H, P, N)` (None: zeros), x/z `(B, H, P)`, dt `(B, H)`, A `(H,)`, B/C `(B, G, N)` or `(B, N)`,
    D `(H,)` or `(H, P)`, dt_bias `(H,)`. Returns `(y (B, H, P) in x's dtype, new_state (B, H, P, N))`."""
    check_tensor("x", x, 3)
    check_tensor("dt", dt, 2)
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X)
        if X.dim() not in (2, 3):
            raise ValueError(f"{name} must have shape (B, G, N) or (B, N), got shape {tuple(X.shape)}")
    if z is not None:
        check_tensor("z", z, 3)
    p = _prepare_ssd(x.unsqueeze(1), dt.unsqueeze(1), A, B.unsqueeze(1), C.unsqueeze(1), D,
                     None if z is None else z.unsqueeze(1), dt_bias, dt_softplus, state, step=True)
    q, k, v, g, S0 = p["q"], p["k"], p["v"], p["g"], p["S0"]
    o, S = retention_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], g[:, :, 0], S0, scale=1.0)
    y = _finish_ssd(o.unsqueeze(2), p)
    return y[:, 0], S.transpose(-1, -2)


def s4d_step(state, u, log_dt, A, B, C, D=None):
    """One token of S4D: state `(B, H, N)` complex (None: zeros), u `(B, H)`, log_dt `(H,)`,
    A/B/C `(H, N)` complex, D `(H,)`. Returns `(y (B, H) in u's dtype, new_state)`."""
    check_tensor("u", u, 2)
    check_float("u", u)
    Bsz, H = u.shape
    check_float("log_dt", log_dt, u)
    check_shape("log_dt", log_dt, (H,), "(H,)")
    check_tensor("A", A, 2)
    check_float("A", A, u, allow_complex=True)
    if A.shape[0] != H:
        raise ValueError(f"A must have shape (H, N) with H = {H}, got {tuple(A.shape)}")
    N = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        check_float(name, X, u, allow_complex=True)
        check_shape(name, X, (H, N), "(H, N)")
    cd = compute_dtype(u, log_dt, A, B, C)
    ct = torch.complex128 if cd == torch.float64 else torch.complex64
    Abar, Bbar = s4d_discretize(log_dt.to(cd), A.to(ct), B.to(ct))
    if state is None:
        x = torch.zeros(Bsz, H, N, dtype=ct, device=u.device)
    else:
        check_float("state", state, u, allow_complex=True)
        check_shape("state", state, (Bsz, H, N), "(B, H, N)")
        x = state.to(ct)
    x = Abar * x + Bbar * u.to(cd).unsqueeze(-1)
    y = 2 * (x * C.to(ct)).sum(-1).real
    if D is not None:
        check_float("D", D, u)
        check_shape("D", D, (H,), "(H,)")
        y = y + D.to(cd) * u.to(cd)
    return y.to(u.dtype), x


@dataclass
class LongConvState:
    """Input history for streaming a causal long convolution: a ring buffer `(B, D, L_k)` holding the
    last `L_k` inputs, stored backwards in time (slot `(-t) mod L_k` holds `u_t`, so that the newest
    input followed by older ones is contiguous modulo L_k and the kernel is read in its natural order),
    and `t`, the number of tokens seen so far. `long_conv_step` writes into `buffer` in place."""

    buffer: torch.Tensor
    t: int = 0

    @classmethod
    def zeros(cls, batch: int, channels: int, kernel_len: int, dtype=torch.float32, device=None):
        return cls(torch.zeros(batch, channels, kernel_len, dtype=dtype, device=device), 0)

    def history(self) -> torch.Tensor:
        """The last L_k inputs in time order `(B, D, L_k)`: u_{t-L_k}, ..., u_{t-1} (zeros before the start)."""
        Lk = self.buffer.shape[-1]
        idx = (-(self.t - Lk + torch.arange(Lk, device=self.buffer.device))) % Lk
        return self.buffer[..., idx]

    @classmethod
    def from_history(cls, hist: torch.Tensor, t: int) -> "LongConvState":
        """The state after `t` tokens whose last L_k inputs, in time order, are `hist (B, D, L_k)`."""
        Lk = hist.shape[-1]
        idx = (-(t - Lk + torch.arange(Lk, device=hist.device))) % Lk
        buf = torch.empty_like(hist)
        buf[..., idx] = hist
        return cls(buf, t)


def long_conv_step(u, kernel, state=None, D=None):
    """One token of the causal `long_conv`: `y_t = sum_{s < L_k} kernel[:, s] u_{t-s} (+ D u_t)`.

    u `(B, D)`, kernel `(D, L_k)`, state a `LongConvState` (None: a fresh one). Cost O(D L_k) per token,
    whatever the context length. Returns `(y (B, D), state)`."""
    check_tensor("u", u, 2)
    check_float("u", u)
    check_tensor("kernel", kernel, 2)
    check_float("kernel", kernel, u)
    Bsz, Dm = u.shape
    if kernel.shape[0] != Dm or kernel.shape[1] == 0:
        raise ValueError(f"kernel must have shape (D, L_k) with D = {Dm}, got {tuple(kernel.shape)}")
    Lk = kernel.shape[1]
    cd = compute_dtype(u, kernel)
    if state is None:
        state = LongConvState.zeros(Bsz, Dm, Lk, dtype=cd, device=u.device)
    elif not isinstance(state, LongConvState):
        raise TypeError(f"state must be a LongConvState or None, got {type(state).__name__}")
    elif tuple(state.buffer.shape) != (Bsz, Dm, Lk):
        raise ValueError(f"state.buffer must have shape (B, D, L_k) = {(Bsz, Dm, Lk)}, "
                         f"got {tuple(state.buffer.shape)}")
    buf = state.buffer
    slot = (-state.t) % Lk
    buf[:, :, slot] = u.to(buf.dtype)
    # u_{t-s} sits in slot (slot + s) mod L_k: two contiguous dot products, O(D L_k), no gather.
    k = kernel.to(buf.dtype)
    n1 = Lk - slot
    y = torch.matmul(buf[:, :, slot:].unsqueeze(-2), k[:, :n1].unsqueeze(-1))
    if slot:
        y = y + torch.matmul(buf[:, :, :slot].unsqueeze(-2), k[:, n1:].unsqueeze(-1))
    y = y.reshape(Bsz, Dm)
    if D is not None:
        check_float("D", D, u)
        check_shape("D", D, (Dm,), "(D,)")
        y = y + D.to(buf.dtype) * u.to(buf.dtype)
    state.t += 1
    return y.to(u.dtype), state
