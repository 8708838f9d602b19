"""Public functions of the linear-attention / delta-rule family, with input validation.

Layout `(B, H, N, D)`; state `(B, H, D_k, D_v)` kept in fp32 (fp64 for fp64 inputs). Every function
computes, per head, the recurrence of `anyattn.linear.recurrent`:

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T                                   (decay family)
    S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T      (delta family)
    o_t = scale * S_t^T q_t                                                    (state updated by t first)

`mode="chunk"` runs the chunkwise engines of `anyattn.linear.chunk` (any N: padded internally),
`mode="recurrent"` the token-by-token loop. `output_final_state=True` returns `(o, S_N)`.
`*_step` functions advance one token for decoding: `q_t (B, H, D_k)` -> `(o_t (B, H, D_v), state)`.
`g` and `beta` may be in any floating dtype (gates are often kept in fp32); q, k, v share one.
Grouped-query heads: q (and q_t) may have `H_q = G * H` heads for the H heads of k and v; gates, beta,
slopes and the state have the H key/value heads, and query head h reads the state of head `h // G`.
"""
from __future__ import annotations

import math

import torch

from ..backends import Choice
from ..backends import fla as fla_backend
from ..validate import FLOAT_DTYPES, check_positive_int, check_scale, check_tensor
from . import chunk as _chunk
from . import recurrent as _rec
from .feature_maps import resolve_feature_map

MODES = ("chunk", "recurrent")


# ----------------------------------------------------------------------------------------- checks

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_float(name, x, ref):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype {[str(d) for d in FLOAT_DTYPES]}, got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on q's device {ref.device}, got {x.device}")


def _check_qkv(q, k, v, step: bool = False):
    """q `(B, H_q, N, D_k)`, k `(B, H, N, D_k)`, v `(B, H, N, D_v)` with H dividing H_q (grouped-query:
    every H_q / H query heads read one state); `step`: the same without N."""
    nd = 3 if step else 4
    names = ("q_t", "k_t", "v_t") if step else ("q", "k", "v")
    dims = "(B, H, D_k)" if step else "(B, H, N, D_k)"
    for name, x in zip(names, (q, k, v)):
        check_tensor(name, x, nd)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{names[0]} must have a floating dtype {[str(d) for d in FLOAT_DTYPES]}, got {q.dtype}")
    for name, x in zip(names[1:], (k, v)):
        if x.device != q.device:
            raise ValueError(f"{name} must be on {names[0]}'s device {q.device}, got {x.device}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} must have {names[0]}'s dtype {q.dtype}, got {x.dtype}")
    same = [i for i in range(nd) if i != 1]
    if any(k.shape[i] != q.shape[i] for i in same):
        raise ValueError(f"{names[1]} must have {names[0]}'s shape {dims} = {tuple(q.shape)} (or fewer heads H "
                         f"dividing {names[0]}'s), got {tuple(k.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{names[1]} must have a number of heads dividing {names[0]}'s H_q = {q.shape[1]} "
                         f"(grouped-query), got {k.shape[1]}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        lead = "(B, H)" if step else "(B, H, N)"
        raise ValueError(f"{names[2]} must have shape {lead[:-1]}, D_v) with {lead} = {tuple(k.shape[:-1])}, "
                         f"got {tuple(v.shape)}")
    if any(s == 0 for s in q.shape) or v.shape[-1] == 0:
        raise ValueError(f"{names[0]}, {names[1]}, {names[2]} must be non-empty, got {names[0]} {tuple(q.shape)}, "
                         f"{names[2]} {tuple(v.shape)}")


def _check_shape(name, x, expected: tuple, desc: str, ref):
    check_tensor(name, x)
    _check_float(name, x, ref)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {desc} = {tuple(expected)}, got {tuple(x.shape)}")


def _check_common(q, k, v, scale, initial_state, mode, chunk_size, output_final_state, state_dims=None):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    B, H, _, K = k.shape
    scale = check_scale(scale, K)
    if initial_state is not None:
        Kf, Vf = state_dims or (K, v.shape[-1])
        _check_shape("initial_state", initial_state, (B, H, Kf, Vf), "(B, H, D_k, D_v)", q)
    return scale


def _state0(initial_state, dt):
    return None if initial_state is None else initial_state.to(dt)


def _check_g(name, g, ref, kind, step=False):
    """kind: "scalar" (B, H, N), "vector" (B, H, N, D_k), "head" (H,) or (B, H, N), with B, H, N, D_k
    those of `ref` (k, or k_t for a step: gates and states belong to the key/value heads)."""
    if step:
        B, H, K = ref.shape
        shapes = {"scalar": ((B, H), "(B, H)"), "vector": ((B, H, K), "(B, H, D_k)")}
    else:
        B, H, N, K = ref.shape
        shapes = {"scalar": ((B, H, N), "(B, H, N)"), "vector": ((B, H, N, K), "(B, H, N, D_k)")}
    check_tensor(name, g)
    _check_float(name, g, ref)
    if kind == "head":
        full, desc = shapes["scalar"]
        if tuple(g.shape) == (H,):
            return g.reshape(1, H, *([1] * (len(full) - 2))).expand(full)
        if tuple(g.shape) != full:
            raise ValueError(f"{name} must have shape (H,) = ({H},) or {desc} = {full}, got {tuple(g.shape)}")
        return g
    full, desc = shapes[kind]
    if tuple(g.shape) != full:
        raise ValueError(f"{name} must have shape {desc} = {full}, got {tuple(g.shape)}")
    return g


def _query_groups(q, H):
    """`(B, H_q, N, D)` -> `(B, H, H_q / H, N, D)`: the query heads reading each of the H states."""
    return q.reshape(q.shape[0], H, q.shape[1] // H, *q.shape[2:])


BACKENDS = ("auto", "anyattn", "fla")


def backend_choice(op: str, q, k, v, mode: str = "chunk", backend: str = "auto") -> Choice:
    """Which implementation `op` (`"gla"`, `"delta_rule"`, `"gated_delta_rule"`, `"kda"`) uses for these
    inputs with `backend="auto"` (or the one forced), and why."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    why = "mode='recurrent' is anyattn's token loop" if mode != "chunk" else fla_backend.unavailable(op, q, k, v)
    if backend == "fla" and why is not None:
        raise ValueError(f"backend='fla' cannot run {op} here: {why}")
    if backend != "anyattn" and why is None:
        return Choice("fla", f"fla's Triton chunk kernel ({fla_backend.OPS[op][1]}) on {q.device.type}, layout "
                             "(B, H, N, D) <-> (B, N, H, D)")
    return Choice("anyattn", f"anyattn's {mode} engine" + ("" if backend == "anyattn" else f" (fla not used: {why})"))


def _engine_options(in_dtype, x):
    """Chunk-engine options: the matmul dtype for inputs of `in_dtype` (bf16 / fp16 inputs: bf16 matmuls on
    CPU), or the autograd path inside `chunk.autograd_backward()`."""
    return {"md": _chunk.matmul_dtype(in_dtype, x.device), "autograd": _chunk.use_autograd()}


def _low_precision(x) -> bool:
    """bf16 / fp16 inputs: the chunk engines take q, k, v as they are (matmuls in low precision); gates and
    states go in fp32."""
    return x.dtype in (torch.bfloat16, torch.float16) and not _chunk.use_autograd()


def _run(q, k, v, *, g=None, beta=None, delta=False, scale=None, initial_state=None,
         output_final_state=False, mode="chunk", chunk_size=64, op=None, backend="auto"):
    if op is not None and backend_choice(op, q, k, v, mode, backend).backend == "fla":
        o, S = fla_backend.chunk(op, q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state)
        return (o, S) if output_final_state else o
    dt = _compute_dtype(q)
    out_dtype = q.dtype
    B, Hq, N, _ = q.shape
    if not (_low_precision(q) and mode == "chunk"):
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    q = _query_groups(q, k.shape[1])
    g = None if g is None else g.to(dt)
    beta = None if beta is None else beta.to(dt)
    S0 = _state0(initial_state, dt)
    if mode == "recurrent":
        o, S = _rec.recurrent(q, k, v, scale, g, beta if delta else None, S0)
    elif delta:
        o, S = _chunk.chunk_delta(q, k, v, beta, scale, g, S0, chunk_size, **_engine_options(out_dtype, q))
    else:
        o, S = _chunk.chunk_decay_attention(q, k, v, scale, g, S0, chunk_size, **_engine_options(out_dtype, q))
    o = o.reshape(B, Hq, N, -1).to(out_dtype)
    return (o, S) if output_final_state else o


def _step(q_t, k_t, v_t, state, scale, g=None, beta=None):
    dt = _compute_dtype(q_t)
    B, H, K = k_t.shape
    V = v_t.shape[-1]
    if state is None:
        S = k_t.new_zeros(B, H, K, V, dtype=dt)
    else:
        _check_shape("state", state, (B, H, K, V), "(B, H, D_k, D_v)", q_t)
        S = state.to(dt)
    o, S = _rec.step(_query_groups(q_t.to(dt), H), k_t.to(dt), v_t.to(dt), S, scale,
                     None if g is None else g.to(dt), None if beta is None else beta.to(dt))
    return o.reshape(q_t.shape[:-1] + (V,)).to(q_t.dtype), S


def _features(q, k, feature_map, feature_options, offset):
    """(phi(q), phi(k), self_bias): self_bias is the map's `self_bias` (EcoFormer's official numerator) or None."""
    fmap = resolve_feature_map(feature_map, q.shape[-1], feature_options)
    if fmap is None:
        return q, k, None
    fq, fk = fmap.map_qk(q, k, offset)
    for name, f, x in (("feature_map(q)", fq, q), ("feature_map(k)", fk, k)):
        if not isinstance(f, torch.Tensor) or tuple(f.shape[:-1]) != tuple(x.shape[:-1]):
            shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{name} must return shape {tuple(x.shape[:-1]) + ('F',)}, got {shape}")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map must give q and k the same feature dim, got {fq.shape[-1]} and {fk.shape[-1]}")
    return fq, fk, getattr(fmap, "self_bias", None)


def _self_bias(o, v, const_row, c2: float, scale: float, causal: bool):
    """Numerator with a map's constant last feature c = sqrt(c2) counted on the query's own value only
    (EcoFormer's public code): `o - scale c2 (sum_{j<=i} v_j + prior) + scale c2 v_i`, where the prior sum of
    values is `const_row / c` (the constant feature's row of the initial state, or None). o `(B, H_q, N, D_v)`,
    v `(B, H, N, D_v)`."""
    G = o.shape[1] // v.shape[1]
    total = v.cumsum(2) if causal else v.sum(2, keepdim=True)
    if const_row is not None:
        total = total + const_row[:, :, None] / math.sqrt(c2)
    return o + (scale * c2) * (v - total).repeat_interleave(G, 1)


def linear_attention(q, k, v, feature_map="elu1", normalize: bool = False, causal: bool = True, *,
                     scale=None, initial_state=None, output_final_state: bool = False, mode: str = "chunk",
                     chunk_size: int = 64, feature_options: dict | None = None, eps: float = 1e-6):
    """Linear attention (Katharopoulos et al., 2020): `S_t = S_{t-1} + phi(k_t) v_t^T`,
    `o_t = scale * phi(q_t)^T S_t` (causal) or `o = scale * phi(q) (S_0 + phi(K)^T V)` (non-causal).

    q, k `(B, H, N, D_k)`, v `(B, H, N, D_v)`. feature_map: "elu1", "relu", "performer",
    "cosformer", "nalaformer" (see `feature_maps`), a feature-map object, a callable `x -> phi(x)`
    applied to q and k, or None (identity). `feature_options`: keyword arguments of the named map
    (e.g. `{"num_features": 128, "seed": 1}` for Performer, `{"max_len": 4096}` for cosFormer).
    scale (default `D_k ** -0.5`) multiplies `phi(q) . phi(k)`.
    normalize=True divides by `scale * phi(q_t) . z_t + eps` with `z_t = sum_{s<=t} phi(k_s)`; the
    state then has one extra value column holding z: shape `(B, H, F, D_v + 1)`.
    Returns `o (B, H, N, D_v)`, or `(o, S_N)` with `output_final_state=True`; S is `(B, H, F, D_v[+1])`.
    """
    _check_qkv(q, k, v)
    if not isinstance(causal, bool) or not isinstance(normalize, bool):
        raise TypeError(f"causal and normalize must be bools, got {type(causal).__name__}, {type(normalize).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    dt = _compute_dtype(q)
    fq, fk, self_bias = _features(q, k, feature_map, feature_options, 0)
    fq, fk = fq.to(dt), fk.to(dt)
    vv = v.to(dt)
    if normalize:
        vv = torch.cat([vv, vv.new_ones(*vv.shape[:-1], 1)], -1)
    scale = _check_common(q, k, v, scale, initial_state, mode, chunk_size, output_final_state,
                          (fq.shape[-1], vv.shape[-1]))
    S0 = _state0(initial_state, dt)
    fqg = _query_groups(fq, k.shape[1])
    if not causal:
        S = fk.transpose(-1, -2) @ vv
        if S0 is not None:
            S = S + S0
        o = scale * (fqg @ S[:, :, None])
    elif mode == "recurrent":
        o, S = _rec.recurrent(fqg, fk, vv, scale, None, None, S0)
    else:
        o, S = _chunk.chunk_decay_attention(fqg, fk, vv, scale, None, S0, chunk_size, **_engine_options(q.dtype, q))
    o = o.reshape(*q.shape[:-1], vv.shape[-1])
    if self_bias:
        Dv = v.shape[-1]
        num = _self_bias(o[..., :Dv], vv[..., :Dv], None if S0 is None else S0[..., -1, :Dv], self_bias, scale, causal)
        o = torch.cat([num, o[..., Dv:]], -1)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    o = o.to(q.dtype)
    return (o, S) if output_final_state else o


def linear_attention_step(q_t, k_t, v_t, state=None, feature_map="elu1", normalize: bool = False, *,
                          scale=None, position: int = 0, feature_options: dict | None = None, eps: float = 1e-6):
    """One causal token of `linear_attention`. q_t, k_t `(B, H, D_k)`, v_t `(B, H, D_v)`, state
    `(B, H, F, D_v[+1])` or None. `position` (0-based index of this token) matters only for
    cosFormer (give `feature_options={"max_len": M}` so M is fixed). Returns `(o_t, state)`."""
    _check_qkv(q_t, k_t, v_t, step=True)
    fq, fk, self_bias = _features(q_t[:, :, None], k_t[:, :, None], feature_map, feature_options, position)
    dt = _compute_dtype(q_t)
    fq, fk = fq[:, :, 0].to(dt), fk[:, :, 0].to(dt)
    vv = v_t.to(dt)
    if normalize:
        vv = torch.cat([vv, vv.new_ones(*vv.shape[:-1], 1)], -1)
    scale = check_scale(scale, q_t.shape[-1])
    o, S = _step(fq, fk, vv, state, scale)
    if self_bias:
        Dv = v_t.shape[-1]
        prior = S[..., -1, :Dv] - math.sqrt(self_bias) * vv[..., :Dv]       # constant row before this token
        num = _self_bias(o[..., None, :Dv], vv[..., None, :Dv], prior, self_bias, scale, True)[..., 0, :]
        o = torch.cat([num, o[..., Dv:]], -1)
    if normalize:
        o = o[..., :-1] / (o[..., -1:] + eps)
    return o.to(q_t.dtype), S


# ---------------------------------------------------------------------------- retention, lightning

def _gated(q, k, v, g, kind, beta, scale, initial_state, output_final_state, mode, chunk_size, op=None,
           backend="auto"):
    """Checks and runs a gated op: g of `kind` ("head", "vector", "scalar"); beta None (decay family)
    or `(B, H, N)` (delta family)."""
    _check_qkv(q, k, v)
    g = _check_g("g", g, k, kind)
    beta = None if beta is None else _check_beta("beta", beta, k)
    scale = _check_common(q, k, v, scale, initial_state, mode, chunk_size, output_final_state)
    return _run(q, k, v, g=g, beta=beta, delta=beta is not None, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, mode=mode, chunk_size=chunk_size, op=op, backend=backend)


def _gated_step(q_t, k_t, v_t, g, kind, beta_t, state, scale, g_name="g_t"):
    """One token of `_gated`."""
    _check_qkv(q_t, k_t, v_t, step=True)
    g = _check_g(g_name, g, k_t, kind, step=True)
    beta_t = None if beta_t is None else _check_beta("beta_t", beta_t, k_t, step=True)
    return _step(q_t, k_t, v_t, state, check_scale(scale, q_t.shape[-1]), g=g, beta=beta_t)


def retention(q, k, v, g, *, scale=None, initial_state=None, output_final_state: bool = False,
              mode: str = "chunk", chunk_size: int = 64):
    """Retention (RetNet, Sun et al., 2023) / scalar-decay linear attention ("simple GLA"):
    `S_t = exp(g_t) S_{t-1} + k_t v_t^T`, `o_t = scale * S_t^T q_t`.
    q, k `(B, H, N, D_k)`, v `(B, H, N, D_v)`, g <= 0 of shape `(H,)` (constant per head, RetNet's
    `log(gamma_h)`) or `(B, H, N)` (per token)."""
    return _gated(q, k, v, g, "head", None, scale, initial_state, output_final_state, mode, chunk_size)


def retention_step(q_t, k_t, v_t, g, state=None, *, scale=None):
    """One token of `retention`; g `(H,)` or `(B, H)`. Returns `(o_t (B, H, D_v), state)`."""
    return _gated_step(q_t, k_t, v_t, g, "head", None, state, scale, g_name="g")


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes (Press et al., 2022): geometric `2^(-8 h / H)` for H a power of two, else the
    power-of-two sequence for the next lower power plus every other slope of the next one."""
    check_positive_int("num_heads", num_heads)

    def pow2(n):
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        s = pow2(num_heads)
    else:
        p = 2 ** math.floor(math.log2(num_heads))
        s = pow2(p) + pow2(2 * p)[0::2][: num_heads - p]
    return torch.tensor(s, dtype=torch.float32)  # host: callers move it


def _lightning_g(k, slopes, step=False):
    H = k.shape[1]
    if slopes is None:
        slopes = alibi_slopes(H).to(k.device)
    else:
        check_tensor("slopes", slopes, 1)
        _check_float("slopes", slopes, k)
        if slopes.shape[0] != H:
            raise ValueError(f"slopes must have shape (H,) = ({H},), got {tuple(slopes.shape)}")
    return -slopes


def lightning(q, k, v, slopes=None, *, scale=None, initial_state=None, output_final_state: bool = False,
              mode: str = "chunk", chunk_size: int = 64):
    """Lightning Attention-2 (Qin et al., 2024): constant per-head decay `lambda_h = exp(-slope_h)`,
    `S_t = lambda_h S_{t-1} + k_t v_t^T`, computed by the same block tiling (intra-block
    `[(Q K^T) ⊙ M] V` with `M_ab = lambda^(a-b)`, inter-block through the state). slopes `(H,)`,
    positive; default: ALiBi slopes. Same function as `retention(q, k, v, g=-slopes)`."""
    _check_qkv(q, k, v)
    return _gated(q, k, v, _lightning_g(k, slopes), "head", None, scale, initial_state, output_final_state, mode,
                  chunk_size)


def lightning_step(q_t, k_t, v_t, state=None, slopes=None, *, scale=None):
    """One token of `lightning`. Returns `(o_t, state)`."""
    _check_qkv(q_t, k_t, v_t, step=True)
    return _gated_step(q_t, k_t, v_t, _lightning_g(k_t, slopes, step=True), "head", None, state, scale, g_name="g")


# -------------------------------------------------------------------------------------------- GLA

def gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state: bool = False,
        mode: str = "chunk", chunk_size: int = 64, backend: str = "auto"):
    """Gated Linear Attention (Yang et al., 2024): `S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T`,
    `o_t = scale * S_t^T q_t`. g <= 0 of shape `(B, H, N, D_k)` (per key channel log-decay).
    backend: "auto" (fla's Triton chunk kernel on CUDA when installed, else anyattn's engine; see
    `backend_choice`), "anyattn" or "fla"."""
    return _gated(q, k, v, g, "vector", None, scale, initial_state, output_final_state, mode, chunk_size,
                  "gla", backend)


def gla_step(q_t, k_t, v_t, g_t, state=None, *, scale=None):
    """One token of `gla`; g_t `(B, H, D_k)`. Returns `(o_t, state)`."""
    return _gated_step(q_t, k_t, v_t, g_t, "vector", None, state, scale)


# ---------------------------------------------------------------------------------- delta family

def _check_beta(name, beta, ref, step=False):
    return _check_g(name, beta, ref, "scalar", step)


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
               mode: str = "chunk", chunk_size: int = 64, backend: str = "auto"):
    """DeltaNet (Schlag et al., 2021; chunkwise: Yang et al., 2024):
    `S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`.
    beta `(B, H, N)`. q and k are used as given (L2-normalize them beforehand for stability).
    backend: "auto" (fla's Triton chunk kernel on CUDA when installed, else anyattn's engine; see
    `backend_choice`), "anyattn" or "fla"."""
    _check_qkv(q, k, v)
    beta = _check_beta("beta", beta, k)
    scale = _check_common(q, k, v, scale, initial_state, mode, chunk_size, output_final_state)
    return _run(q, k, v, beta=beta, delta=True, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, mode=mode, chunk_size=chunk_size, op="delta_rule",
                backend=backend)


def delta_rule_step(q_t, k_t, v_t, beta_t, state=None, *, scale=None):
    """One token of `delta_rule`; beta_t `(B, H)`. Returns `(o_t, state)`."""
    _check_qkv(q_t, k_t, v_t, step=True)
    beta_t = _check_beta("beta_t", beta_t, k_t, step=True)
    return _step(q_t, k_t, v_t, state, check_scale(scale, q_t.shape[-1]), beta=beta_t)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
                     mode: str = "chunk", chunk_size: int = 64, backend: str = "auto"):
    """Gated DeltaNet (Yang et al., 2025): `S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`,
    `o_t = scale * S_t^T q_t`. g <= 0 `(B, H, N)` (scalar log-decay per token), beta `(B, H, N)`.
    backend: "auto" (fla's Triton chunk kernel on CUDA when installed, else anyattn's engine; see
    `backend_choice`), "anyattn" or "fla"."""
    return _gated(q, k, v, g, "scalar", beta, scale, initial_state, output_final_state, mode, chunk_size,
                  "gated_delta_rule", backend)


def gated_delta_rule_step(q_t, k_t, v_t, g_t, beta_t, state=None, *, scale=None):
    """One token of `gated_delta_rule`; g_t, beta_t `(B, H)`. Returns `(o_t, state)`."""
    return _gated_step(q_t, k_t, v_t, g_t, "scalar", beta_t, state, scale)


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state: bool = False,
        mode: str = "chunk", chunk_size: int = 64, backend: str = "auto"):
    """Kimi Delta Attention (Kimi Linear, 2025):
    `S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T`, `o_t = scale * S_t^T q_t`.
    g <= 0 `(B, H, N, D_k)` (per key channel log-decay), beta `(B, H, N)`.
    backend: "auto" (fla's Triton chunk kernel on CUDA when installed, else anyattn's engine; see
    `backend_choice`), "anyattn" or "fla"."""
    return _gated(q, k, v, g, "vector", beta, scale, initial_state, output_final_state, mode, chunk_size,
                  "kda", backend)


def kda_step(q_t, k_t, v_t, g_t, beta_t, state=None, *, scale=None):
    """One token of `kda`; g_t `(B, H, D_k)`, beta_t `(B, H)`. Returns `(o_t, state)`."""
    return _gated_step(q_t, k_t, v_t, g_t, "vector", beta_t, state, scale)
