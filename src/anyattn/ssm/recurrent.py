"""Step-by-step recurrences of the SSM family: the oracles the parallel forms are tested against. They run
in whatever dtype they are given (float64 included) and depend on nothing but torch; the one-token decoding
steps, with their argument checks, live in `steps.py`.

Shapes, canonical (grouped) forms used inside `anyattn.ssm`:

- selective scan (Mamba, Gu & Dao 2023): state x `(B, G, Dg, N)`, u/delta `(B, G, Dg, L)`,
  A `(G, Dg, N)`, B/C `(B, G, L, N)`; `x_t = exp(delta_t A) x_{t-1} + delta_t B_t u_t`, `y_t = C_t . x_t`.
- SSD (Mamba-2, Dao & Gu 2024): state `(B, H, P, N)`, x `(B, L, H, P)`, dt `(B, L, H)`, A `(H,)`,
  B/C `(B, L, G, N)`; `h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T`, `y_t = h_t C_t`.
- S4D (Gu et al. 2022): complex diagonal state `(B, H, N)`; `x_t = Abar x_{t-1} + Bbar u_t`,
  `y_t = 2 Re(C . x_t)`.
- long convolution: direct causal convolution (`long_conv_ref`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_recurrent_core", "ssd_ref", "s4d_ref", "s4d_discretize", "long_conv_ref"]


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


# ------------------------------------------------------------------------------- long convolution

def long_conv_ref(u, kernel, D=None):
    """Direct causal convolution by `torch.nn.functional.conv1d` (O(L L_k)): u `(B, D, L)`, kernel `(D, L_k)`."""
    Dm, Lk = kernel.shape
    L = u.shape[-1]
    y = F.conv1d(F.pad(u, (Lk - 1, 0)), kernel.flip(-1).unsqueeze(1), groups=Dm)[..., :L]
    if D is not None:
        y = y + D[:, None] * u
    return y
