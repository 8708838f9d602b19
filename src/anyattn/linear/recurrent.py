"""The step-by-step recurrence: the oracle of the linear family and its `mode="recurrent"` path.

One token update covers every method (per head, state S of shape (D_k, D_v)):

    S <- Diag(exp(g_t)) S                      (g_t: scalar or per key channel; absent: no decay)
    S <- S + k_t v_t^T                         (linear attention, retention, GLA)
    S <- S + beta_t k_t (v_t - S^T k_t)^T      (delta rule family)
    o_t = scale * S^T q_t                      (for each of the G query heads sharing this state)

which is, for the delta family, `S_t = (I - beta k k^T) Diag(alpha) S_{t-1} + beta k v^T` (KDA;
Gated DeltaNet has a scalar alpha; DeltaNet has alpha = 1). Written plainly: one Python iteration
per token. Inputs here are already validated and in the compute dtype (fp32 or fp64).
"""
from __future__ import annotations

import torch


def step(q, k, v, S, scale: float, g=None, beta=None):
    """One token. q `(B, H, G, D_k)` (the G query heads reading each state), k `(B, H, D_k)`,
    v `(B, H, D_v)`, S `(B, H, D_k, D_v)`, g `(B, H)` (scalar decay) or `(B, H, D_k)` (per channel)
    or None, beta `(B, H)` or None. Returns `(o (B, H, G, D_v), S)`."""
    if g is not None:
        if g.dim() == 2:
            S = S * torch.exp(g)[..., None, None]
        else:
            S = S * torch.exp(g)[..., :, None]
    if beta is None:
        S = S + k[..., :, None] * v[..., None, :]
    else:
        v_old = (S * k[..., :, None]).sum(-2)
        S = S + k[..., :, None] * (beta[..., None] * (v - v_old))[..., None, :]
    o = scale * (S[:, :, None] * q[..., :, None]).sum(-2)
    return o, S


def recurrent(q, k, v, scale: float, g=None, beta=None, initial_state=None):
    """Full sequence by the recurrence. q `(B, H, G, N, D_k)`, k `(B, H, N, D_k)`, v `(B, H, N, D_v)`,
    g `(B, H, N)` or `(B, H, N, D_k)` or None, beta `(B, H, N)` or None, initial_state
    `(B, H, D_k, D_v)` or None. Returns `(o (B, H, G, N, D_v), S_N)` in the dtype of q."""
    B, H, N, Dk = k.shape
    Dv = v.shape[-1]
    S = k.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state
    outs = []
    for t in range(N):
        gt = None if g is None else g[:, :, t]
        bt = None if beta is None else beta[:, :, t]
        o, S = step(q[:, :, :, t], k[:, :, t], v[:, :, t], S, scale, gt, bt)
        outs.append(o)
    return torch.stack(outs, 3), S
