"""Chimera's 2-D selective state-space recurrence over variates x time (Behrouz, Santacatterina and
Zabih, "Chimera: Effectively Modeling Multivariate Time Series with 2-Dimensional State Space Models",
NeurIPS 2024), one head.

Recurrence (Roesser form, Roesser 1975; Chimera's Eq. for the 2-D SSM; per channel d, diagonal in the
state index n; cell (v, t) = variate v, time t):

    h1[v, t] = exp(dt[v,t] A1) h1[v, t-1] + dt[v,t] (A2 h2[v, t-1] + B1[v,t] x[v,t])     (time state)
    h2[v, t] = exp(dv[v,t] A4) h2[v-1, t] + dv[v,t] (A3 h1[v-1, t] + B2[v,t] x[v,t])     (variate state)
    y[v, t]  = C1[v,t] . h1[v, t] + C2[v,t] . h2[v, t] + D x[v, t]

Discretization (our decision, see docs/structured.md): the continuous 2-D system
`d h1/dt = A1 h1 + A2 h2 + B1 x`, `d h2/dv = A3 h1 + A4 h2 + B2 x` is discretized per axis with the input-
dependent step (dt along time, dv along variates) as Mamba discretizes it: zero-order hold on the
diagonal block (`exp(dt A1)`, `exp(dv A4)`), the Euler rule (`dt A2`, `dv A3`, `dt B1`, `dv B2`) on the
coupling and input terms. Boundary: `h2[-1, t] = h1[-1, t] = 0`; `h1[v, -1]`, `h2[v, -1]` come from
`initial_state` (zeros by default), so the op can stream over time.

Exact row algorithm (no 2-D scan needed): rows v in order; `h2[v, :]` is explicit from row v - 1
(elementwise over t), then `h1[v, :]` is ONE 1-D scan over t with decay `exp(dt A1)` and input
`dt (A2 h2[v, t-1] + B1 x)` -- exactly `anyattn.ssm.selective_scan` with every (d, n) pair as its own
channel of state size 1. V sequential steps instead of the V + T - 1 of the wavefront.
`mode="wavefront"` is the oracle: a loop over anti-diagonals (every cell of a diagonal depends only on
the previous diagonal), vectorized over the cells of each diagonal.
"""
from __future__ import annotations

import torch

from ._checks import check_float, check_shape, check_tensor, compute_dtype
from .selective_scan import selective_scan

MODES = ("rows", "wavefront")

__all__ = ["chimera", "chimera_step", "MODES"]


def _check(x, delta_t, delta_v, A, B1, B2, C1, C2, D, initial_state, mode):
    check_tensor("x", x, 4)
    check_float("x", x)
    Bsz, Dm, V, T = x.shape
    if 0 in x.shape:
        raise ValueError(f"x must be non-empty (B, D, V, T), got shape {tuple(x.shape)}")
    for name, t in (("delta_t", delta_t), ("delta_v", delta_v)):
        check_float(name, t, x)
        check_shape(name, t, (Bsz, Dm, V, T), "(B, D, V, T)")
    if not isinstance(A, (tuple, list)) or len(A) != 4:
        raise ValueError(f"A must be a sequence of the four matrices (A1, A2, A3, A4), got {type(A).__name__}")
    N = None
    for i, a in enumerate(A):
        check_float(f"A{i + 1}", a, x)
        if a.dim() != 2 or a.shape[0] != Dm or a.shape[1] == 0 or (N is not None and a.shape[1] != N):
            raise ValueError(f"A{i + 1} must have shape (D, N) with D = {Dm}"
                             f"{'' if N is None else f' and N = {N}'}, got {tuple(a.shape)}")
        N = a.shape[1]
    for name, t in (("B1", B1), ("B2", B2), ("C1", C1), ("C2", C2)):
        check_float(name, t, x)
        check_shape(name, t, (Bsz, N, V, T), "(B, N, V, T)")
    if D is not None:
        check_float("D", D, x)
        check_shape("D", D, (Dm,), "(D,)")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("initial_state must be a pair (h1, h2) of (B, D, V, N) tensors")
        for name, t in zip(("initial_state[0]", "initial_state[1]"), initial_state):
            check_float(name, t, x)
            check_shape(name, t, (Bsz, Dm, V, N), "(B, D, V, N)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return Bsz, Dm, V, T, N


def _rows(x, dt, dv, A1, A2, A3, A4, B1, B2, C1, C2, h1_0, h2_0, chunk_size):
    """Row algorithm. x/dt/dv `(B, D, V, T)`, A* `(D, N)`, B*/C* `(B, N, V, T)`, h*_0 `(B, D, V, N)` or None.
    Returns y `(B, D, V, T)` (without the D skip) and the last time column (h1, h2) `(B, D, V, N)`.
    States are kept as `(B, D, N, T)`, the layout of `selective_scan`'s channels (no copies between)."""
    Bsz, Dm, V, T = x.shape
    N = A1.shape[1]
    a1 = A1.reshape(Dm * N, 1)
    a2, a3, a4 = A2[:, :, None], A3[:, :, None], A4[:, :, None]            # (D, N, 1)
    ones = x.new_ones(Bsz, 1, T)
    h1 = h2 = None                                                          # row v - 1, (B, D, N, T)
    ys, last1, last2 = [], [], []
    for v in range(V):
        xv = x[:, :, v].unsqueeze(2)                                        # (B, D, 1, T)
        dvv = dv[:, :, v].unsqueeze(2)
        bx2 = xv * B2[:, :, v].unsqueeze(1)                                 # B2 x, (B, D, N, T)
        if h1 is None:
            h2 = dvv * bx2
        else:
            h2 = torch.exp(dvv * a4) * h2 + dvv * torch.addcmul(bx2, a3, h1)
        # h1's input: A2 h2[v, t-1] + B1 x, with h2[v, -1] from the initial state.
        h2_start = h2.new_zeros(Bsz, Dm, N, 1) if h2_0 is None else h2_0[:, :, v].unsqueeze(-1)
        u = torch.addcmul(xv * B1[:, :, v].unsqueeze(1), a2, torch.cat([h2_start, h2[..., :-1]], -1))
        delta = dt[:, :, v].unsqueeze(2).expand(Bsz, Dm, N, T).reshape(Bsz, Dm * N, T)
        init = None if h1_0 is None else h1_0[:, :, v].reshape(Bsz, Dm * N, 1)
        h1, _ = selective_scan(u.reshape(Bsz, Dm * N, T), delta, a1, ones, ones, initial_state=init,
                               output_final_state=True, chunk_size=chunk_size)
        h1 = h1.reshape(Bsz, Dm, N, T)
        ys.append((h1 * C1[:, :, v].unsqueeze(1)).sum(2) + (h2 * C2[:, :, v].unsqueeze(1)).sum(2))
        last1.append(h1[..., -1])
        last2.append(h2[..., -1])
    return torch.stack(ys, 2), torch.stack(last1, 2), torch.stack(last2, 2)


def _wavefront(x, dt, dv, A1, A2, A3, A4, B1, B2, C1, C2, h1_0, h2_0):
    """The oracle: anti-diagonals d = v + t in order, vectorized over the cells of each diagonal."""
    Bsz, Dm, V, T = x.shape
    N = A1.shape[1]
    H1 = x.new_zeros(Bsz, Dm, V, N) if h1_0 is None else h1_0.clone()   # row v's latest h1 (time t - 1)
    H2 = x.new_zeros(Bsz, Dm, V, N) if h2_0 is None else h2_0.clone()
    y = x.new_zeros(Bsz, Dm, V, T)
    zero = x.new_zeros(Bsz, Dm, 1, N)
    for d in range(V + T - 1):
        v = torch.arange(max(0, d - T + 1), min(V - 1, d) + 1, device=x.device)
        t = d - v
        xc = x[:, :, v, t].unsqueeze(-1)                                    # (B, D, c, 1)
        dtc, dvc = dt[:, :, v, t].unsqueeze(-1), dv[:, :, v, t].unsqueeze(-1)
        b1, b2 = B1[:, :, v, t].transpose(1, 2).unsqueeze(1), B2[:, :, v, t].transpose(1, 2).unsqueeze(1)
        c1, c2 = C1[:, :, v, t].transpose(1, 2).unsqueeze(1), C2[:, :, v, t].transpose(1, 2).unsqueeze(1)
        h1_left, h2_left = H1[:, :, v], H2[:, :, v]                         # (v, t - 1)
        up1 = torch.cat([zero, H1], 2)[:, :, v]                             # (v - 1, t); zero above row 0
        up2 = torch.cat([zero, H2], 2)[:, :, v]
        n1 = torch.exp(dtc * A1[:, None]) * h1_left + dtc * (A2[:, None] * h2_left + b1 * xc)
        n2 = torch.exp(dvc * A4[:, None]) * up2 + dvc * (A3[:, None] * up1 + b2 * xc)
        y[:, :, v, t] = (n1 * c1).sum(-1) + (n2 * c2).sum(-1)
        H1 = H1.index_copy(2, v, n1)
        H2 = H2.index_copy(2, v, n2)
    return y, H1, H2


def chimera(x, delta_t, delta_v, A, B1, B2, C1, C2, D=None, *, initial_state=None,
            output_final_state: bool = False, mode: str = "rows", chunk_size: int = 32):
    """One head of Chimera's 2-D selective SSM over variates x time (module doc for the equations).

    x, delta_t, delta_v `(B, D, V, T)` (channels D, variates V, time T; steps > 0, e.g. softplus outputs);
    A = (A1, A2, A3, A4), each `(D, N)` real (A1, A4 negative for decaying time / variate states;
    A2, A3 couple them); B1, B2, C1, C2 `(B, N, V, T)` (input-dependent, shared by the channels, as in
    Mamba); D `(D,)` skip. initial_state: `(h1, h2)`, each `(B, D, V, N)`, the states at time -1 (to
    continue a series). mode: "rows" (V 1-D scans on `selective_scan`) or "wavefront" (the oracle).
    Returns y `(B, D, V, T)` in x's dtype, or `(y, (h1, h2))` with the states at the last time step
    (fp32, fp64 for fp64 inputs) when `output_final_state`.
    """
    _check(x, delta_t, delta_v, A, B1, B2, C1, C2, D, initial_state, mode)
    cd = compute_dtype(x, delta_t, delta_v, *A, B1, B2, C1, C2, D, *(initial_state or ()))
    args = [t.to(cd) for t in (x, delta_t, delta_v, *A, B1, B2, C1, C2)]
    h0 = (None, None) if initial_state is None else tuple(t.to(cd) for t in initial_state)
    if mode == "rows":
        y, h1, h2 = _rows(*args, *h0, chunk_size)
    else:
        y, h1, h2 = _wavefront(*args, *h0)
    if D is not None:
        y = y + D.to(cd)[:, None, None] * args[0]
    y = y.to(x.dtype)
    return (y, (h1, h2)) if output_final_state else y


def chimera_step(state, x, delta_t, delta_v, A, B1, B2, C1, C2, D=None):
    """One time step of `chimera` for all variates (streaming over time).

    state: `(h1, h2)` each `(B, D, V, N)` (None: zeros); x, delta_t, delta_v `(B, D, V)`; A as in `chimera`;
    B1, B2, C1, C2 `(B, N, V)`; D `(D,)`. h1 is updated for every variate at once; h2 is one scan over the
    variates (`selective_scan` along v). Returns `(y (B, D, V), (h1, h2))`.
    """
    check_tensor("x", x, 3)
    step = lambda t: None if t is None else t.unsqueeze(-1)  # noqa: E731
    init = None if state is None else state
    _check(x.unsqueeze(-1), step(delta_t), step(delta_v), A, step(B1), step(B2), step(C1), step(C2), D, init, "rows")
    cd = compute_dtype(x, delta_t, delta_v, *A, B1, B2, C1, C2, D, *(state or ()))
    dtype = x.dtype
    x, dt, dv, A1, A2, A3, A4, B1, B2, C1, C2 = (t.to(cd) for t in (x, delta_t, delta_v, *A, B1, B2, C1, C2))
    Bsz, Dm, V = x.shape
    N = A1.shape[1]
    if state is None:
        h1_prev = h2_prev = x.new_zeros(Bsz, Dm, V, N)
    else:
        h1_prev, h2_prev = (t.to(cd) for t in state)
    b1, b2 = B1.transpose(1, 2).unsqueeze(1), B2.transpose(1, 2).unsqueeze(1)   # (B, 1, V, N)
    xe, dte, dve = x.unsqueeze(-1), dt.unsqueeze(-1), dv.unsqueeze(-1)
    h1 = torch.exp(dte * A1[:, None]) * h1_prev + dte * (A2[:, None] * h2_prev + b1 * xe)
    # h2[v] = exp(dv A4) h2[v-1] + dv (A3 h1[v-1] + B2 x[v]): a scan over v (h1 of this step is known).
    h1_up = torch.cat([h1.new_zeros(Bsz, Dm, 1, N), h1[:, :, :-1]], 2)
    u = (A3[:, None] * h1_up + b2 * xe).permute(0, 1, 3, 2).reshape(Bsz, Dm * N, V)
    delta = dv.unsqueeze(2).expand(Bsz, Dm, N, V).reshape(Bsz, Dm * N, V)
    ones = x.new_ones(Bsz, 1, V)
    h2 = selective_scan(u, delta, A4.reshape(Dm * N, 1), ones, ones).reshape(Bsz, Dm, N, V).transpose(2, 3)
    y = (h1 * C1.transpose(1, 2).unsqueeze(1)).sum(-1) + (h2 * C2.transpose(1, 2).unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + D.to(cd)[:, None] * x
    return y.to(dtype), (h1, h2)
