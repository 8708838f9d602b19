"""Mamba-2's SSD (Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through
Structured State Space Duality", 2024): a selective SSM whose decay is one scalar per head and token,

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T          (h: (P, N) per head)
    y_t = h_t C_t + D x_t,  then  y *= silu(z)

Arguments follow `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`: x `(B, L, H, P)`,
dt `(B, L, H)`, A `(H,)`, B/C `(B, L, G, N)` (H divisible by G; `(B, L, N)` means G = 1).

One engine, two names: this is exactly scalar-decay linear attention, so it is computed by
`anyattn.linear.retention` with

    q = C,  k = B,  v = x * dt,  g = dt * A  (per-token log-decay, <= 0 for A < 0),  scale = 1,

in retention's layout `(B, H, L, .)`; retention's state `S (B, H, N, P)` is the transpose of Mamba's
`h (B, H, P, N)`, which is the state layout used here (initial_state, final state, `ssd_step`).
"""
from __future__ import annotations

import torch.nn.functional as F

from ._checks import check_float, check_mode, check_positive_int, check_shape, check_tensor, compute_dtype

__all__ = ["ssd"]


def _prepare_ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state, step=False):
    check_tensor("x", x, 4)
    check_float("x", x)
    Bsz, L, H, P = x.shape
    if min(Bsz, L, H, P) == 0:
        raise ValueError(f"x must be non-empty (B, L, H, P), got shape {tuple(x.shape)}")
    check_float("dt", dt, x)
    if step:
        check_shape("dt", dt[:, 0] if dt.dim() == 3 else dt, (Bsz, H), "(B, H)")
    else:
        check_shape("dt", dt, (Bsz, L, H), "(B, L, H)")
    check_float("A", A, x)
    check_shape("A", A, (H,), "(H,)")
    groups = []
    for name, X in (("B", B), ("C", C)):
        check_tensor(name, X)
        check_float(name, X, x)
        if X.dim() == 3:
            X = X.unsqueeze(2)
        lead = "(B, G, N)" if step else "(B, L, G, N)"
        if X.dim() != 4 or X.shape[0] != Bsz or X.shape[1] != L or X.shape[2] == 0 or H % X.shape[2] != 0 \
                or X.shape[3] == 0:
            shown = tuple(X.shape[:1]) + tuple(X.shape[2:]) if step and X.dim() == 4 else tuple(X.shape)
            raise ValueError(f"{name} must have shape {lead} with B = {Bsz}{'' if step else f', L = {L}'} and "
                             f"H = {H} divisible by G, got {shown}")
        groups.append(X)
    Bg, Cg = groups
    if Bg.shape[2:] != Cg.shape[2:]:
        raise ValueError(f"B and C must have the same (G, N), got B: {tuple(Bg.shape[2:])}, C: {tuple(Cg.shape[2:])}")
    G, N = Bg.shape[2], Bg.shape[3]
    if D is not None:
        check_float("D", D, x)
        if tuple(D.shape) not in ((H,), (H, P)):
            raise ValueError(f"D must have shape (H,) = ({H},) or (H, P) = {(H, P)}, got {tuple(D.shape)}")
    if z is not None:
        check_float("z", z, x)
        check_shape("z", z, tuple(x.shape), "(B, L, H, P)" if not step else "(B, 1, H, P)")
    if dt_bias is not None:
        check_float("dt_bias", dt_bias, x)
        check_shape("dt_bias", dt_bias, (H,), "(H,)")
    if initial_state is not None:
        check_float("state" if step else "initial_state", initial_state, x)
        check_shape("state" if step else "initial_state", initial_state, (Bsz, H, P, N), "(B, H, P, N)")
    cd = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_state)
    dtc = dt.to(cd)
    if dt_bias is not None:
        dtc = dtc + dt_bias.to(cd)
    if dt_softplus:
        dtc = F.softplus(dtc)
    xc = x.to(cd)
    rep = H // G
    k = Bg.to(cd).repeat_interleave(rep, dim=2).transpose(1, 2)          # (B, H, L, N)
    q = Cg.to(cd).repeat_interleave(rep, dim=2).transpose(1, 2)
    v = (xc * dtc.unsqueeze(-1)).transpose(1, 2)                       # (B, H, L, P)
    g = (dtc * A.to(cd)).transpose(1, 2)                               # (B, H, L)
    S0 = None if initial_state is None else initial_state.to(cd).transpose(-1, -2)  # (B, H, N, P)
    return {"q": q, "k": k, "v": v, "g": g, "S0": S0, "x": xc, "D": None if D is None else D.to(cd),
            "z": None if z is None else z.to(cd), "dtype": x.dtype}


def _finish_ssd(o, p):
    """o `(B, H, L, P)` from retention -> y `(B, L, H, P)` in x's dtype."""
    y = o.transpose(1, 2)
    D = p["D"]
    if D is not None:
        y = y + (D[:, None] if D.dim() == 1 else D) * p["x"]
    if p["z"] is not None:
        y = y * F.silu(p["z"])
    return y.to(p["dtype"])


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False, *, initial_state=None,
        output_final_state: bool = False, mode: str = "chunk", chunk_size: int = 64):
    """Mamba-2 SSD by `anyattn.linear.retention` (see module doc for the mapping).

    x `(B, L, H, P)`, dt `(B, L, H)` (dt_bias `(H,)` added, then softplus if `dt_softplus`), A `(H,)`
    (negative), B/C `(B, L, G, N)` or `(B, L, N)`, D `(H,)` or `(H, P)`, z `(B, L, H, P)`,
    initial_state `(B, H, P, N)`. Returns y `(B, L, H, P)` in x's dtype, or `(y, final_state (B, H, P, N))`
    (fp32, fp64 for fp64 inputs) if `output_final_state`. mode "chunk" | "recurrent" is retention's.
    """
    check_mode(mode)
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    p = _prepare_ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
    from ..linear import retention
    o, S = retention(p["q"], p["k"], p["v"], p["g"], scale=1.0, initial_state=p["S0"], output_final_state=True,
                     mode=mode, chunk_size=chunk_size)
    y = _finish_ssd(o, p)
    return (y, S.transpose(-1, -2)) if output_final_state else y
