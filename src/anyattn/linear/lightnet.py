"""LightNet's additive "one scan" linear attention (Qin et al., 2025, "You Only Scan Once: Efficient
Multi-dimension Sequential Modeling with LightNet").

Per key channel c, the key logits x_t are normalized by their running log-sum-exp:

    z_t = logaddexp(z_{t-1}, x_t),   k̃_t = exp(x_t - z_t),   g_t = z_{t-1} - z_t <= 0

and the result is GLA with keys k̃, per-channel log-decays g and scale 1 (`anyattn.linear.gla`'s chunk
engine), which is the same function as

    o_t = scale * sum_c q_{t,c} (sum_{s<=t} e^{x_{s,c}} v_s) / (e^{z_0} + sum_{s<=t} e^{x_{s,c}}).

The op applies no activation to q (LightNet's layer applies silu). `z0` is the starting log-normalizer:
-inf as in flash-linear-attention, 0 as in xmixers (an extra e^0 in every denominator). Non-causal:
`o = scale * q (softmax_N(X)^T V)`, one global reduction. The state is `LightNetState(S, z)`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..validate import check_scale
from . import recurrent as _rec
from .ops import MODES, _check_qkv, _check_shape, _compute_dtype, _query_groups, _run


class LightNetState(NamedTuple):
    """S `(B, H, D_k, D_v)`: the GLA state; z `(B, H, D_k)`: the running log-sum-exp of the key logits."""

    S: torch.Tensor
    z: torch.Tensor


def _check_z0(z0) -> float:
    if isinstance(z0, bool) or not isinstance(z0, (int, float)) or math.isnan(z0) or z0 == math.inf:
        raise ValueError(f"z0 must be a float in [-inf, inf), got {z0!r}")
    return float(z0)


def _state(state, name, k, V, z0, dt):
    """(S, z) in the compute dtype from a LightNetState / pair or None (zeros, z = z0)."""
    B, H, K = k.shape[0], k.shape[1], k.shape[-1]
    if state is None:
        return k.new_zeros(B, H, K, V, dtype=dt), k.new_full((B, H, K), z0, dtype=dt)
    if not (isinstance(state, tuple) and len(state) == 2):
        raise TypeError(f"{name} must be a LightNetState (S, z) or None, got {type(state).__name__}")
    S, z = state
    _check_shape(f"{name}.S", S, (B, H, K, V), "(B, H, D_k, D_v)", k)
    _check_shape(f"{name}.z", z, (B, H, K), "(B, H, D_k)", k)
    return S.to(dt), z.to(dt)


def _decay(z_prev, z):
    """g = z_prev - z, with 0 where nothing was seen yet (z_prev = -inf: the state is still empty)."""
    return torch.where(torch.isinf(z_prev), torch.zeros_like(z), z_prev - z)


# Tokens per block of the blocked log-cumsum-exp (see `_logcumsumexp`).
_LCSE_BLOCK = 64


def _logcumsumexp(x: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """`logaddexp(z0, logcumsumexp(x, 2))` for x `(B, H, N, D)`, z0 `(B, H, D)`.

    Blocked: inside blocks of 64 tokens `m + log(cumsum(exp(x - m)))` with m the block's max (an
    elementwise cumsum), then the blocks' totals by `torch.logcumsumexp` over N / 64 entries. Several
    times faster than `torch.logcumsumexp` over N on CPU. Exact unless a block spans more than the
    exponent range of the dtype (a term would underflow): then `torch.logcumsumexp` is used."""
    B, H, N, D = x.shape
    C = _LCSE_BLOCK
    pad = (-N) % C
    xp = torch.cat([x, x[:, :, -1:].expand(B, H, pad, D)], 2) if pad else x
    xb = xp.reshape(B, H, -1, C, D)
    m = xb.amax(3, keepdim=True)
    span = 80.0 if x.dtype == torch.float32 else 700.0
    if bool(((m - xb.amin(3, keepdim=True)) > span).any()):
        return torch.logaddexp(z0[:, :, None], torch.logcumsumexp(x, 2))
    local = torch.log(torch.cumsum(torch.exp(xb - m), 3)) + m              # (B, H, n, C, D)
    totals = torch.logcumsumexp(torch.cat([z0[:, :, None], local[:, :, :, -1]], 2), 2)  # z at block ends
    z = torch.logaddexp(totals[:, :, :-1, None], local)
    return z.reshape(B, H, -1, D)[:, :, :N]


def lightnet(q, k_logits, v, *, causal: bool = True, z0: float = float("-inf"), scale: float = 1.0,
             initial_state=None, output_final_state: bool = False, mode: str = "chunk", chunk_size: int = 64):
    """LightNet linear attention (see the module docstring).

    q, k_logits `(B, H, N, D_k)` (q may have `G * H` heads: grouped-query), v `(B, H, N, D_v)`.
    causal: prefix normalization (GLA engine, `mode`, `chunk_size` as `gla`); False: one global
    softmax over N per key channel. z0: initial log-normalizer (-inf or 0 in public codes).
    initial_state: a `LightNetState` (S, z) (its z replaces z0). Returns o `(B, H_q, N, D_v)`, or
    `(o, LightNetState)` with `output_final_state=True`."""
    _check_qkv(q, k_logits, v)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    z0 = _check_z0(z0)
    scale = check_scale(scale, q.shape[-1])
    dt = _compute_dtype(q)
    x = k_logits.to(dt)
    S0, zp = _state(initial_state, "initial_state", k_logits, v.shape[-1], z0, dt)
    if causal:
        z = _logcumsumexp(x, zp)
        # g_t = z_{t-1} - z_t; at t = 0 it is 0 when nothing was seen before (z_prev = -inf)
        g = torch.diff(z, dim=2, prepend=torch.where(torch.isinf(zp), z[:, :, 0], zp)[:, :, None]).neg_()
        o, S = _run(q, torch.exp(x - z), v, g=g, scale=scale, initial_state=S0, output_final_state=True,
                    mode=mode, chunk_size=chunk_size)
        z = z[:, :, -1]
    else:
        z = torch.logaddexp(zp, torch.logsumexp(x, 2))
        S = torch.exp(x - z[:, :, None]).transpose(-1, -2) @ v.to(dt)
        S = S + torch.exp(_decay(zp, z))[..., None] * S0
        o = (scale * (_query_groups(q.to(dt), k_logits.shape[1]) @ S[:, :, None])).reshape(*q.shape[:-1], -1)
        o = o.to(q.dtype)
    return (o, LightNetState(S, z)) if output_final_state else o


def lightnet_step(q_t, k_t, v_t, state=None, *, z0: float = float("-inf"), scale: float = 1.0):
    """One causal token of `lightnet`: q_t, k_t (logits) `(B, H, D_k)`, v_t `(B, H, D_v)`, state a
    `LightNetState` or None (zeros with z = z0). Returns `(o_t (B, H_q, D_v), LightNetState)`."""
    _check_qkv(q_t, k_t, v_t, step=True)
    z0 = _check_z0(z0)
    scale = check_scale(scale, q_t.shape[-1])
    dt = _compute_dtype(q_t)
    S, zp = _state(state, "state", k_t, v_t.shape[-1], z0, dt)
    x = k_t.to(dt)
    z = torch.logaddexp(zp, x)
    H = k_t.shape[1]
    o, S = _rec.step(_query_groups(q_t.to(dt), H), torch.exp(x - z), v_t.to(dt), S, scale, g=_decay(zp, z))
    return o.reshape(*q_t.shape[:-1], -1).to(q_t.dtype), LightNetState(S, z)
