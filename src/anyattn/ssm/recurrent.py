"""Step-by-step recurrences of the SSM family: the oracles the parallel forms are tested against
(they run in whatever dtype they are given, float64 included) and the one-token steps for decoding.

Shapes, canonical (grouped) forms used inside `anyattn.ssm`:

- selective scan (Mamba, Gu & Dao 2023): state x `(B, G, Dg, N)`, u/delta `(B, G, Dg, L)`,
  A `(G, Dg, N)`, B/C `(B, G, L, N)`; `x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t`, `y_t = C_t . x_t`.
- SSD (Mamba-2, Dao & Gu 2024): state `(B, H, P, N)`, x `(B, L, H, P)`, dt `(B, L, H)`, A `(H,)`,
  B/C `(B, L, G, N)`; `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`, `y_t = h_t C_t`.
- S4D (Gu et al. 2022): complex diagonal state `(B, H, N)`; `x_t = Abar x_{t-1} + Bbar u_t`,
  `y_t = 2 Re(C . x_t)`.
- long convolution: a ring buffer of the last `L_k` inputs (`LongConvState`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._checks import check_float, check_shape, check_tensor, compute_dtype

__all__ = ["selective_scan_ref", "selective_scan_step", "ssd_ref", "ssd_step", "s4d_ref", "s4d_step",
           "s4d_discretize", "LongConvState", "long_conv_step", "long_conv_ref"]


# ------------------------------------------------------------------------------- selective scan

def _ss_step_core(x, u_t, dt_t, A, B_t, C_t):
    """x `(B, G, Dg, N)`, u_t/dt_t `(B, G, Dg)`, A `(G, Dg, N)`, B_t/C_t `(B, G, N)`."""
    x = torch.exp(dt_t.unsqueeze(-1) * A) * x + (dt_t * u_t).unsqueeze(-1) * B_t.unsqueeze(-2)
    y = (x * C_t.unsqueeze(-2)).sum(-1)
    return x, y


def selective_scan_recurrent_core(u, dt, A, Bt, Ct, h0=None):
    """Token loop over canonical tensors (see module doc). Returns y `(B, G, Dg, L)`, last state."""
    Bsz, G, Dg, L = u.shape
    x = u.new_zeros(Bsz, G, Dg, A.shape[-1]) if h0 is None else h0
    ys = []
    for t in range(L):
        x, y = _ss_step_core(x, u[..., t], dt[..., t], A, Bt[:, :, t], Ct[:, :, t])
        ys.append(y)
    return torch.stack(ys, -1), x


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       initial_state=None, output_final_state=False):
    """The step-by-step recurrence with `selective_scan`'s signature (it is `mode="recurrent"`)."""
    from .selective_scan import selective_scan
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state=initial_state,
                          output_final_state=output_final_state, mode="recurrent")


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


# -------------------------------------------------------------------------------------------- SSD

def ssd_ref(x, dt, A, B, C, D=None, z=None, initial_state=None):
    """Direct recurrence of Mamba-2's SSD (no dt bias / softplus: pass the final dt).

    x `(B, L, H, P)`, dt `(B, L, H)`, A `(H,)`, B/C `(B, L, G, N)`, D `(H,)` or `(H, P)`, z like x,
    initial_state `(B, H, P, N)`. Returns `(y (B, L, H, P), last_state (B, H, P, N))` in x's dtype."""
    Bsz, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    rep = H // G
    h = x.new_zeros(Bsz, H, P, N) if initial_state is None else initial_state.to(x.dtype)
    Bh = B.repeat_interleave(rep, dim=2)
    Ch = C.repeat_interleave(rep, dim=2)
    ys = []
    for t in range(L):
        dA = torch.exp(dt[:, t] * A)                                          # (B, H)
        h = dA[..., None, None] * h + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * x
    if z is not None:
        y = y * F.silu(z)
    return y, h


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token of `ssd`, through `anyattn.linear.retention_step` (q = C, k = B, v = x dt, g = dt A).

    state `(B, H, P, N)` (None: zeros), x/z `(B, H, P)`, dt `(B, H)`, A `(H,)`, B/C `(B, G, N)` or `(B, N)`,
    D `(H,)` or `(H, P)`, dt_bias `(H,)`. Returns `(y (B, H, P) in x's dtype, new_state (B, H, P, N))`."""
    from .ssd import _prepare_ssd, _finish_ssd
    from ..linear import retention_step
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


# -------------------------------------------------------------------------------------------- S4D

def s4d_discretize(log_dt, A, B):
    """ZOH: `Abar = exp(dt A)`, `Bbar = (exp(dt A) - 1) / A * B` (complex, `(H, N)`)."""
    dtA = torch.exp(log_dt).unsqueeze(-1) * A
    Abar = torch.exp(dtA)
    return Abar, (Abar - 1) / A * B


def s4d_ref(u, log_dt, A, B, C, D=None, initial_state=None):
    """S4D by its recurrence: u `(B, H, L)` real; returns `(y (B, H, L), last_state (B, H, N) complex)`."""
    Abar, Bbar = s4d_discretize(log_dt, A, B)
    Bsz, H, L = u.shape
    x = torch.zeros(Bsz, H, A.shape[-1], dtype=Abar.dtype, device=u.device) if initial_state is None \
        else initial_state.to(Abar.dtype)
    ys = []
    for t in range(L):
        x = Abar * x + Bbar * u[..., t, None]
        ys.append(2 * (x * C).sum(-1).real)
    y = torch.stack(ys, -1).to(u.dtype)
    if D is not None:
        y = y + D[:, None] * u
    return y, x


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


# ------------------------------------------------------------------------------- long convolution

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


def long_conv_ref(u, kernel, D=None):
    """Direct causal convolution by `torch.nn.functional.conv1d` (O(L L_k)): u `(B, D, L)`, kernel `(D, L_k)`."""
    Dm, Lk = kernel.shape
    L = u.shape[-1]
    y = F.conv1d(F.pad(u, (Lk - 1, 0)), kernel.flip(-1).unsqueeze(1), groups=Dm)[..., :L]
    if D is not None:
        y = y + D[:, None] * u
    return y
