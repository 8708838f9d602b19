"""int8 KV storage with per-token, per-head absmax scales (LLM.int8()-style vector-wise quantization,
Dettmers et al., 2022, applied to the KV cache as in KIVI / KVQuant's per-token variant).

For one token of one head, x `(D,)` is stored as `round(x / s)` in int8 with `s = max|x| / 127`
(float32). Dequantization is `x_hat = q * s`; the error per element is at most `s / 2 = max|x| / 254`.
A zero vector gets scale 0 and dequantizes exactly.
"""
from __future__ import annotations

import torch

QMAX = 127.0


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x `(..., D)` float -> `(q int8 (..., D), scale float32 (...,))` with absmax over the last dim."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize`: `q (..., D) int8`, `scale (...,)` -> `(..., D)` in `dtype`."""
    if dtype == torch.float64:
        return q.double() * scale.double().unsqueeze(-1)
    out = q.float() * scale.unsqueeze(-1)
    return out if dtype == torch.float32 else out.to(dtype)


def error_bound(x: torch.Tensor) -> torch.Tensor:
    """The per-element bound `max|x| / 254` of `dequantize(quantize(x))` for each vector in x `(..., D)`."""
    return x.float().abs().amax(dim=-1) / (2 * QMAX)
