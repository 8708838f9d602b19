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


# Tokens per block of the blocked running log-sum-exp (see `_NormalizedKeys`).
_LCSE_BLOCK = 64
# The blocked path is taken when every block's first w (see `_logcumsumexp`) is at least this: then
# z_{block start} > (block max) - 69 (fp32; -667 fp64), so no exp in the forward or backward overflows.
_SPAN = {torch.float32: 1e-30, torch.float64: 1e-290}


def _blocks(x):
    B, H, N, D = x.shape
    pad = (-N) % _LCSE_BLOCK
    xp = torch.cat([x, x[:, :, -1:].expand(B, H, pad, D)], 2) if pad else x
    return xp.reshape(B, H, -1, _LCSE_BLOCK, D)


def _logcumsumexp(x: torch.Tensor, zp: torch.Tensor):
    """`z = logaddexp(zp, logcumsumexp(x, 2))` for x `(B, H, N, D)`, zp `(B, H, D)`, blocked: inside blocks
    of 64 tokens an elementwise `cumsum(exp(x - m))` with m the block's max; the block totals by
    `torch.logcumsumexp` over N / 64 entries; then per block, with T the total of the earlier blocks and
    r = max(m, T), `z = r + log(w)`, `w = e^{m - r} cumsum(exp(x - m)) + e^{T - r}` (every factor <= 1).
    Several times faster than `torch.logcumsumexp` over N on CPU. Also returns the blocks' first `w`
    (the smallest of each block): z is exact when it is a normal number far from underflow."""
    N = x.shape[2]
    xb = _blocks(x)
    m = xb.amax(3, keepdim=True)
    cs = torch.cumsum(torch.exp(xb - m), 3)                                   # (B, H, n, C, D)
    totals = torch.logcumsumexp(torch.cat([zp[:, :, None], m[:, :, :, 0] + torch.log(cs[:, :, :, -1])], 2), 2)
    before = totals[:, :, :-1, None]                                          # z before each block
    r = torch.maximum(m, before)
    w = torch.addcmul(torch.exp(before - r), torch.exp(m - r), cs)
    return torch.log(w).add_(r).flatten(2, 3)[:, :, :N], w[:, :, :, 0]


def _keys_and_decays(x, zp, z):
    """k̃ = exp(x - z) and g_t = z_{t-1} - z_t (g_0 = 0 when nothing was seen before: zp = -inf)."""
    g = torch.diff(z, dim=2, prepend=torch.where(torch.isinf(zp), z[:, :, 0], zp)[:, :, None]).neg_()
    return torch.exp(x - z), g


class _NormalizedKeys(torch.autograd.Function):
    """x `(B, H, N, D)`, zp `(B, H, D)` -> (k̃, g, z_N) with a hand-written backward (autograd through the
    blocked log-sum-exp keeps a dozen N x D tensors). With dz_t = -dk̃_t k̃_t - dg_t + dg_{t+1} (+ dz_N at
    the end), `dx_s = dk̃_s k̃_s + sum_{t>=s} dz_t e^{x_s - z_t}`, computed per block with the block's first
    z as reference (every factor <= 1 or bounded by the span check) and a reverse scan over blocks."""

    @staticmethod
    def forward(ctx, x, zp, z):
        k = torch.sub(x, z).exp_()
        g = torch.empty_like(z)
        torch.sub(z[:, :, :-1], z[:, :, 1:], out=g[:, :, 1:])                   # g_t = z_{t-1} - z_t
        g[:, :, 0] = torch.where(torch.isinf(zp), 0.0, zp - z[:, :, 0])
        ctx.save_for_backward(x, zp, z, k)
        return k, g, z[:, :, -1]

    @staticmethod
    def backward(ctx, dk, dg, dz_last):
        x, zp, z, k = ctx.saved_tensors
        B, H, N, D = x.shape
        seen = torch.isfinite(zp)
        dz = -dk * k - dg
        dz[:, :, :-1] += dg[:, :, 1:]
        dz[:, :, 0] += torch.where(seen, 0.0, dg[:, :, 0])                     # g_0 = 0 did not depend on z_0
        dz[:, :, -1] += dz_last
        zb, xb = _blocks(z), _blocks(x)
        dzb = _blocks(torch.cat([dz, dz.new_zeros(B, H, zb.shape[2] * _LCSE_BLOCK - N, D)], 2) if N % _LCSE_BLOCK else dz)
        ref = zb[:, :, :, :1]                                                     # (B, H, n, 1, D)
        w = dzb * torch.exp(ref - zb)
        suffix = w.flip(3).cumsum(3).flip(3)                                      # sum over t >= s inside the block
        totals, refs = suffix[:, :, :, 0], ref[:, :, :, 0]                        # (B, H, n, D)
        carry = [torch.zeros_like(totals[:, :, 0])]
        for b in range(totals.shape[2] - 1, 0, -1):                               # later blocks, rescaled
            carry.append(torch.exp(refs[:, :, b - 1] - refs[:, :, b]) * (totals[:, :, b] + carry[-1]))
        carry = torch.stack(carry[::-1], 2)                                       # (B, H, n, D)
        dx = torch.exp(xb - ref) * (suffix + carry[:, :, :, None])
        dx = dx.flatten(2, 3)[:, :, :N] + dk * k
        first = torch.exp(torch.where(seen, zp, refs[:, :, 0]) - refs[:, :, 0]) * (totals[:, :, 0] + carry[:, :, 0])
        dzp = torch.where(seen, first + dg[:, :, 0], torch.zeros_like(zp))
        return dx, dzp, None


def _normalized_keys(x, zp):
    """(k̃, g, z_N): the blocked path with the hand-written backward when every block's first running
    log-sum-exp is within the dtype's range of the block's largest logit (then no term of the forward or the
    backward under- or overflows), else autograd through torch.logcumsumexp (exact for any logits, slower)."""
    with torch.no_grad():
        z, start = _logcumsumexp(x, zp)
    if bool((start >= _SPAN[x.dtype]).all()):
        return _NormalizedKeys.apply(x, zp, z)
    z = torch.logaddexp(zp[:, :, None], torch.logcumsumexp(x, 2))
    k, g = _keys_and_decays(x, zp, z)
    return k, g, z[:, :, -1]


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
        k, g, z = _normalized_keys(x, zp)
        o, S = _run(q, k, v, g=g, scale=scale, initial_state=S0, output_final_state=True, mode=mode,
                    chunk_size=chunk_size)
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
