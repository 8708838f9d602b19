"""SSM layers for models: S4D, Mamba, Mamba-2 and long-convolution mixers.

Every layer maps x `(B, L, hidden)` to y `(B, L, hidden)` with `forward(x, state=None, use_cache=False)
-> (y, new_state)`: `state` (from a previous call) continues a sequence, `use_cache=True` returns the
state after the last token (else `new_state` is None). Feeding a sequence token by token with
`use_cache=True` gives the same outputs as one full forward; single-token calls use the O(1) steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ssm import (LongConvState, long_conv, long_conv_step, s4d, s4d_inv_init, s4d_lin_init, s4d_step,
                   selective_scan, selective_scan_step, ssd, ssd_step)
from ..distributed.context import current as _cp_current
from ..ssm.long_conv import fft_conv, smooth_kernel, squash_kernel

__all__ = ["S4DLayer", "MambaBlock", "Mamba2Block", "LongConvLayer", "SSM_LAYERS"]


def _check_x(x, hidden):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden:
        raise ValueError(f"x must have shape (B, L, hidden) with hidden = {hidden}, got {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must be non-empty (B, L, hidden), got {tuple(x.shape)}")


def _dt_bias_init(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Mamba's dt bias: dt ~ log-uniform[dt_min, dt_max] (floored), bias = softplus^-1(dt)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _check_glu(glu):
    if not isinstance(glu, bool):
        raise TypeError(f"glu must be a bool, got {type(glu).__name__}")
    return glu


def _output_linear(hidden: int, glu: bool) -> nn.Linear:
    """The position-wise output map of S4D / long convolutions: `Linear(hidden, 2 hidden)` then GLU (the
    published `output_linear`), or `Linear(hidden, hidden)` with `glu=False`."""
    return nn.Linear(hidden, 2 * hidden if _check_glu(glu) else hidden)


def _causal_conv(x, weight, bias, prefix):
    """Depthwise causal conv over (B, C, L) with the last K-1 inputs `prefix` (B, C, K-1) (None: zeros).
    Returns the output and the new prefix."""
    K = weight.shape[-1]
    if prefix is None:
        prefix = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    xp = torch.cat([prefix.to(x.dtype), x], -1)
    y = F.conv1d(xp, weight, bias, groups=x.shape[1])
    return y, xp[..., xp.shape[-1] - (K - 1):]


def _context_parallel(layer, state, use_cache, supported: bool = True):
    """The active `anyattn.distributed.context_parallel` (None outside one); decoding is refused inside."""
    cp = _cp_current()
    if cp is not None:
        if not supported:
            raise ValueError(f"{type(layer).__name__} is not context-parallel (its mixer has no sharded form yet); "
                             "call it outside ad.context_parallel")
        cp.refuse_cache(layer, state, use_cache)
    return cp


def _conv(cp, x, conv1d, prefix):
    """The block's short causal conv over (B, C, L), with the neighbouring rank's halo under `cp`."""
    if cp is None:
        return _causal_conv(x, conv1d.weight, conv1d.bias, prefix)
    y = cp.conv(lambda t, h: _causal_conv(t, conv1d.weight, conv1d.bias, h)[0], x, conv1d.kernel_size[0], dim=-1)
    return y, None


class S4DLayer(nn.Module):
    """S4D mixer (Gu et al. 2022, the standalone `models/s4/s4d.py` of state-spaces/s4): per channel a
    diagonal complex SSM of `d_state` modes, each standing for a conjugate pair (the published N = 64 real
    states are 32 modes), `y = GELU(K * u + D u)`, then the output map `GLU(Linear(hidden, 2 hidden))`
    (`glu=False`: `Linear(hidden, hidden)`). state: `(B, hidden, d_state)` complex."""

    def __init__(self, hidden: int, d_state: int = 32, init: str = "lin", dt_min: float = 1e-3,
                 dt_max: float = 1e-1, glu: bool = True):
        super().__init__()
        if init not in ("lin", "inv"):
            raise ValueError(f"init must be 'lin' or 'inv', got {init!r}")
        self.hidden, self.d_state = hidden, d_state
        A = (s4d_lin_init if init == "lin" else s4d_inv_init)(hidden, d_state)
        self.log_A_real = nn.Parameter(torch.log(-A.real).float())
        self.A_imag = nn.Parameter(A.imag.float())
        self.log_dt = nn.Parameter(torch.rand(hidden) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(hidden, d_state, dtype=torch.complex64)))
        self.register_buffer("B", torch.ones(hidden, d_state, dtype=torch.complex64), persistent=False)
        self.D = nn.Parameter(torch.randn(hidden))
        self.glu = glu
        self.out_proj = _output_linear(hidden, glu)

    def _params(self):
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        return self.log_dt, A, self.B, torch.view_as_complex(self.C)

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden)
        _context_parallel(self, state, use_cache, supported=False)
        log_dt, A, B, C = self._params()
        if x.shape[1] == 1 and state is not None:
            y, new = s4d_step(state, x[:, 0], log_dt, A, B, C, self.D)
            y = y.unsqueeze(1)
        else:
            out = s4d(x.transpose(1, 2), log_dt, A, B, C, self.D, initial_state=state,
                      output_final_state=use_cache)
            y, new = out if use_cache else (out, None)
            y = y.transpose(1, 2)
        y = self.out_proj(F.gelu(y))
        return (F.glu(y, -1) if self.glu else y), (new if use_cache else None)


class MambaBlock(nn.Module):
    """Mamba mixer (Gu & Dao 2023, `mamba_simple.Mamba`): in_proj -> (x, z); x -> short causal depthwise
    conv -> SiLU -> x_proj -> (dt, B, C); dt_proj; selective scan with D skip and SiLU(z) gate; out_proj.
    Published initialization: dt bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max];
    `A_log = log(1..d_state)`; D = 1. state: `{"conv": (B, d_inner, d_conv-1), "ssm": (B, d_inner, d_state)}`."""

    def __init__(self, hidden: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4, dt_scale: float = 1.0,
                 conv_bias: bool = True, bias: bool = False, chunk_size: int = 32):
        super().__init__()
        self.hidden, self.d_state, self.d_conv = hidden, d_state, d_conv
        self.d_inner = di = expand * hidden
        self.dt_rank = math.ceil(hidden / 16) if dt_rank == "auto" else int(dt_rank)
        self.chunk_size = chunk_size
        self.in_proj = nn.Linear(hidden, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, bias=conv_bias)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di, bias=True)
        std = self.dt_rank ** -0.5 * dt_scale
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj.weight, -std, std)
            self.dt_proj.bias.copy_(_dt_bias_init(di, dt_min, dt_max, dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, hidden, bias=bias)

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden)
        cp = _context_parallel(self, state, use_cache)
        Bsz, L, _ = x.shape
        xs, z = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)          # (B, di, L) each
        xs, conv_state = _conv(cp, xs, self.conv1d, None if state is None else state["conv"])
        xs = F.silu(xs)
        dt, Bm, Cm = self.x_proj(xs.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)            # (B, di, L), bias added in the scan
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state["ssm"]
        if L == 1 and state is not None:
            y, last = selective_scan_step(h0, xs[..., 0], delta[..., 0], A, Bm[:, 0], Cm[:, 0], self.D.float(),
                                          z[..., 0], self.dt_proj.bias.float(), True)
            y = y.unsqueeze(-1)
        else:
            y, last = (selective_scan if cp is None else cp.selective_scan)(
                xs, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D.float(), z, self.dt_proj.bias.float(),
                True, initial_state=h0, output_final_state=True, chunk_size=self.chunk_size)
        out = self.out_proj(y.transpose(1, 2))
        return out, ({"conv": conv_state, "ssm": last} if use_cache else None)


class Mamba2Block(nn.Module):
    """Mamba-2 mixer (Dao & Gu 2024, `mamba2_simple`): in_proj -> (z, xBC, dt); xBC -> short causal
    depthwise conv -> SiLU -> (x, B, C); SSD with per-head scalar decay (`anyattn.ssm.ssd`, computed by
    `anyattn.linear.retention`), D skip; gated RMSNorm `norm(y * SiLU(z))`; out_proj.
    state: `{"conv": (B, conv_dim, d_conv-1), "ssm": (B, nheads, headdim, d_state)}`."""

    def __init__(self, hidden: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, A_init_range=(1.0, 16.0), dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, bias: bool = False, conv_bias: bool = True, chunk_size: int = 64,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.hidden, self.d_state, self.d_conv, self.headdim, self.ngroups = hidden, d_state, d_conv, headdim, ngroups
        self.d_inner = di = expand * hidden
        if di % headdim != 0:
            raise ValueError(f"expand * hidden ({di}) must be divisible by headdim ({headdim})")
        self.nheads = nh = di // headdim
        if nh % ngroups != 0:
            raise ValueError(f"nheads ({nh}) must be divisible by ngroups ({ngroups})")
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.conv_dim = di + 2 * ngroups * d_state
        self.in_proj = nn.Linear(hidden, 2 * di + 2 * ngroups * d_state + nh, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(_dt_bias_init(nh, dt_min, dt_max, dt_init_floor))
        A = torch.empty(nh).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(nh))
        self.norm_weight = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, hidden, bias=bias)

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden)
        cp = _context_parallel(self, state, use_cache)
        Bsz, L, _ = x.shape
        di, G, N, H, P = self.d_inner, self.ngroups, self.d_state, self.nheads, self.headdim
        z, xBC, dt = self.in_proj(x).split([di, self.conv_dim, H], dim=-1)
        xBC, conv_state = _conv(cp, xBC.transpose(1, 2), self.conv1d, None if state is None else state["conv"])
        xBC = F.silu(xBC).transpose(1, 2)                                    # (B, L, conv_dim)
        xs, Bm, Cm = xBC.split([di, G * N, G * N], dim=-1)
        xs = xs.reshape(Bsz, L, H, P)
        Bm, Cm = Bm.reshape(Bsz, L, G, N), Cm.reshape(Bsz, L, G, N)
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state["ssm"]
        if L == 1 and state is not None:
            y, last = ssd_step(h0, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], self.D.float(), None,
                               self.dt_bias.float(), True)
            y = y.unsqueeze(1)
        else:
            y, last = (ssd if cp is None else cp.ssd)(xs, dt, A, Bm, Cm, self.D.float(), None, self.dt_bias.float(), True,
                                              initial_state=h0, output_final_state=True, chunk_size=self.chunk_size)
        y = y.reshape(Bsz, L, di) * F.silu(z)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.norm_weight
        return self.out_proj(y), ({"conv": conv_state, "ssm": last} if use_cache else None)


class LongConvLayer(nn.Module):
    """Long-convolution mixer (Fu et al. 2023, safari's `LongConv` / `LongConvKernel`): a learned causal
    kernel of `max_len` taps per channel, initialised N(0, kernel_init_std^2) (published 0.002), regularized
    by squash (`squash_lambda`, published layer config 3e-3) and smoothing (`smooth_width`), applied by FFT;
    `y = GLU(out_proj(GELU(k * u + D u)))` (`glu=False`: no GLU, `out_proj` hidden -> hidden).
    state: a `LongConvState` (ring buffer of the last `max_len` inputs)."""

    def __init__(self, hidden: int, max_len: int, squash_lambda: float | None = 3e-3,
                 smooth_width: int | None = None, kernel_init_std: float = 0.002, glu: bool = True):
        super().__init__()
        self.hidden, self.max_len = hidden, max_len
        self.squash_lambda, self.smooth_width = squash_lambda, smooth_width
        self.kernel = nn.Parameter(torch.randn(hidden, max_len) * kernel_init_std)
        self.D = nn.Parameter(torch.randn(hidden))
        self.glu = glu
        self.out_proj = _output_linear(hidden, glu)

    def effective_kernel(self) -> torch.Tensor:
        k = self.kernel
        if self.squash_lambda:
            k = squash_kernel(k, self.squash_lambda)
        if self.smooth_width:
            k = smooth_kernel(k, self.smooth_width)
        return k

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden)
        _context_parallel(self, state, use_cache, supported=False)
        Bsz, L, _ = x.shape
        k = self.effective_kernel()
        u = x.transpose(1, 2)
        Lk = self.max_len
        if state is None and not use_cache:
            if L > Lk:
                raise ValueError(f"x's length must be <= max_len = {Lk}, got {L}")
            y = long_conv(u, k[:, :L], self.D)
            new = None
        elif L == 1:
            if state is None:
                state = LongConvState.zeros(Bsz, self.hidden, Lk, dtype=torch.float64 if x.dtype == torch.float64
                                            else torch.float32, device=x.device)
            y, new = long_conv_step(u[..., 0], k, state, self.D)
            y = y.unsqueeze(-1)
        else:
            if state is None:
                state = LongConvState.zeros(Bsz, self.hidden, Lk, dtype=torch.float64 if x.dtype == torch.float64
                                            else torch.float32, device=x.device)
            if not isinstance(state, LongConvState):
                raise TypeError(f"state must be a LongConvState or None, got {type(state).__name__}")
            ext = torch.cat([state.history().to(u.dtype), u], -1)               # inputs t-Lk .. t+L-1
            y = fft_conv(ext, k.to(ext.dtype))[..., Lk:] + self.D[:, None] * u
            new = LongConvState.from_history(ext[..., -Lk:].detach().to(state.buffer.dtype), state.t + L)
        y = y.transpose(1, 2)
        y = self.out_proj(F.gelu(y))
        return (F.glu(y, -1) if self.glu else y), (new if use_cache else None)


SSM_LAYERS = {"s4d": S4DLayer, "mamba": MambaBlock, "mamba2": Mamba2Block, "longconv": LongConvLayer}
