"""Shared plumbing of the approximate methods: option checks, seeded generators, mask screening,
grouped-query expansion. Their exact pieces run on `softmax.lse_attention.attention_lse`.

Every approximate method accepts `seed=` (int, default 0; None draws fresh randomness each call):
its random draws (projections, samples) come from a CPU `torch.Generator` seeded with it, so a call
is deterministic under a seed on every device.
"""
from __future__ import annotations

import math

import torch

from ..masks import Causal, KeyPadding, Mask
from ..validate import Shape, check_positive_int

SEED_DOC = "seed for the random draws (int, default 0: deterministic; None: fresh randomness each call)"


def generator(seed) -> torch.Generator:
    """A CPU generator seeded with `seed` (None: nondeterministic)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


positive_int = check_positive_int


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_kv(req, dtype=None):
    """q `(B, H, N_q, D)`, k, v expanded from H_kv to H heads; cast to `dtype` (default: the work dtype)."""
    q, k, v = req.q, req.k, req.v
    dt = dtype or work_dtype(q)
    G = req.shape.groups
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    return q.to(dt), k.to(dt), v.to(dt)


def screen(req, name: str, *, causal: bool = False, causal_square: bool = False, key_padding: bool = False):
    """The reason a method cannot run `req` (None if it can). `causal`: the method honours `Causal`;
    `causal_square`: only when N_q == N_k; `key_padding`: honours `KeyPadding`. Biases are refused
    (approximate methods never silently drop a bias)."""
    sh = req.shape
    if req.bias is not None:
        return (f"{name} does not support bias= (got {req.bias!r}); an approximation that ignored it "
                "would be silently wrong")
    m = req.mask
    if m is None:
        return None
    if isinstance(m, Causal) and causal:
        if causal_square and sh.N_q != sh.N_k:
            return f"{name} supports a causal mask only with N_q == N_k, got N_q={sh.N_q}, N_k={sh.N_k}"
        return None
    if isinstance(m, KeyPadding) and key_padding:
        return None
    ok = ["Causal"] if causal else []
    if key_padding:
        ok.append("KeyPadding")
    what = (" and ".join(ok) + " masks") if ok else "no mask"
    return f"{name} supports {what} only, got mask {m!r}"


def key_lengths(mask: Mask | None, B: int, n_k: int, device) -> torch.Tensor | None:
    """`(B,)` key lengths of a KeyPadding mask, else None."""
    if isinstance(mask, KeyPadding):
        return mask.lengths.to(device)
    return None


def causal_offset(mask, n_q: int, n_k: int) -> int | None:
    """Query i sees keys j <= i + offset under `mask` (a Causal), else None."""
    if isinstance(mask, Causal):
        return mask.offset(n_q, n_k)
    return None


def pad_to(x: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` along `dim` to length `n`."""
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim)


def finish(out: torch.Tensor, lse, req):
    """Cast the output back to the input dtype; LSE stays float32/64 (or None when not requested)."""
    out = out.to(req.q.dtype)
    if not req.return_lse:
        return out, None
    return out, lse
