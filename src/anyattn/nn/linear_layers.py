"""Token-mixing layers of the linear-attention / delta-rule family, built on `anyattn.linear`.

Each layer maps `x (B, T, hidden_size)` to `y (B, T, hidden_size)`:

    q, k, v = short_conv(proj(x))          (causal depthwise conv + SiLU; optional for GLA)
    gates   = per-token decay g <= 0 (and beta in (0, 1) for the delta rules)
    o       = mixer(q, k, v, gates, state)  (anyattn.linear: gla / gated_delta_rule / kda / mom)
    y       = o_proj(RMSNorm(o) * act(output_gate(x)))   (Gated DeltaNet's use_gate=False: no gate)

`forward(x, state=None, use_cache=False) -> (y, new_state)`. The state is a dict with the
recurrent state `"recurrent"` `(B, H, D_k, D_v)` (fp32) and the short-convolution caches `"conv"`
(the last `conv_size - 1` inputs of each convolution), so a decoding loop can call forward with one
token at a time; `new_state` is None unless `use_cache=True`.

Published layers followed (flash-linear-attention's `fla/layers`: structure, widths and initialisation
of the gates):
- `GLALayer`: Gated Linear Attention (Yang et al., 2024): low-rank gate `g = logsigmoid(W2 W1 x) / 16`,
  Swish output gate, no short convolution by default; key width hidden/2, value width hidden.
- `GatedDeltaNetLayer`: Gated DeltaNet (Yang et al., 2025): Mamba2-style scalar decay
  `g = -exp(A_log) * softplus(a(x) + dt_bias)` with A ~ U(0, 16) and dt_bias = softplus^-1(dt),
  dt log-uniform in [1e-3, 1e-1]; `beta = sigmoid(b(x))`, L2-normalized q and k, short convolutions,
  Swish output gate, `expand_v = 2`.
- `KDALayer`: Kimi Delta Attention (Kimi Linear, 2025): per-channel decay
  `g = -exp(A_log[h]) * softplus(W2 W1 x + dt_bias)` with A ~ U(1, 16) and a per-channel dt_bias
  initialised as Gated DeltaNet's; `beta = sigmoid(b(x))`, L2-normalized q and k, short convolutions,
  low-rank output gate with sigmoid activation.
- `MoMLayer`: Mixture-of-Memories (Du et al., 2025): top-k router over Gated DeltaNet memories (own
  k, v, decay, beta per memory) plus a shared memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import linear as _L
from ..distributed.context import current as context_parallel


class ShortConvolution(nn.Module):
    """Causal depthwise 1D convolution over time (kernel `conv_size`) followed by SiLU.
    `forward(x (B, T, C), cache (B, conv_size - 1, C) | None) -> (y (B, T, C), new_cache)`; the cache
    holds the last `conv_size - 1` inputs. Computed as `conv_size` shifted multiply-adds (cheaper than
    a grouped conv for kernel 4, and the same in every dtype)."""

    def __init__(self, channels: int, conv_size: int = 4, bias: bool = False, activation: bool = True):
        super().__init__()
        self.channels, self.conv_size, self.activation = channels, conv_size, activation
        self.weight = nn.Parameter(torch.empty(channels, 1, conv_size))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None):
        B, T, C = x.shape
        W = self.conv_size
        if cache is None:
            cache = x.new_zeros(B, W - 1, C)
        xp = torch.cat([cache.to(x.dtype), x], 1)                       # (B, T + W - 1, C)
        w = self.weight[:, 0, :].to(x.dtype)                            # (C, W)
        y = xp[:, W - 1:] * w[:, W - 1]
        for j in range(W - 1):
            y = y + xp[:, j:j + T] * w[:, j]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        if self.activation:
            y = F.silu(y)
        return y, xp[:, xp.shape[1] - (W - 1):]


class GatedRMSNorm(nn.Module):
    """`RMSNorm(o) * weight * act(gate)` over the last dim; act is "swish" or "sigmoid"."""

    def __init__(self, dim: int, eps: float = 1e-5, activation: str = "swish"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.activation = eps, activation

    def forward(self, o, gate=None):
        dt = o.dtype
        o = _up(o)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(o.dtype)
        if gate is not None:
            gate = _up(gate)
            o = o * (F.silu(gate) if self.activation == "swish" else torch.sigmoid(gate))
        return o.to(dt)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (gates and norms are computed in fp32, or fp64 for fp64 layers)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _check_layer_args(hidden_size, num_heads, head_dim, mode):
    for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be a positive int, got {val!r}")
    if mode not in _L.MODES:
        raise ValueError(f"mode must be one of {list(_L.MODES)}, got {mode!r}")


def _dt_bias(n: int) -> torch.Tensor:
    """Mamba2's dt bias (fla GatedDeltaNet / KimiDeltaAttention): `softplus^-1(dt)`, dt log-uniform in
    [1e-3, 1e-1], floored at 1e-4. `(n,)`."""
    dt = torch.exp(torch.rand(n) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)).clamp_min(1e-4)
    return dt + torch.log(-torch.expm1(-dt))                                   # inverse softplus


def _init_scalar_decay_gates(layer, hidden_size: int, heads: int):
    """Gated DeltaNet's gate parameters for `heads` state heads (Mamba2-style decay, as fla's
    `GatedDeltaNet`): a_proj, b_proj, `A_log = log A`, A ~ U(0, 16), dt_bias from `_dt_bias`."""
    layer.a_proj = nn.Linear(hidden_size, heads, bias=False)
    layer.b_proj = nn.Linear(hidden_size, heads, bias=False)
    layer.A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(0, 16)))
    layer.dt_bias = nn.Parameter(_dt_bias(heads))


def _scalar_decay_gates(layer, x):
    """`g = -exp(A_log) softplus(a(x) + dt_bias)`, `beta = sigmoid(b(x))`: `(B, T, heads)` each."""
    g = -_up(layer.A_log).exp() * F.softplus(_up(layer.a_proj(x)) + layer.dt_bias)
    return g, torch.sigmoid(_up(layer.b_proj(x)))


def _kv_heads(num_heads, num_kv_heads):
    """num_kv_heads (None: num_heads) checked to divide num_heads (grouped-query heads)."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1 \
            or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must be a positive int dividing num_heads={num_heads}, got {num_kv_heads!r}")
    return num_kv_heads


def _head_v_dim(head_dim, expand_v):
    """`head_dim * expand_v`, which must be a positive integer (fla's GatedDeltaNet / KDA convention)."""
    if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)):
        raise TypeError(f"expand_v must be a float, got {type(expand_v).__name__}")
    head_v_dim = int(round(head_dim * expand_v))
    if not math.isclose(head_dim * expand_v, head_v_dim) or head_v_dim < 1:
        raise ValueError(f"head_dim * expand_v must be a positive integer, got {head_dim} * {expand_v}")
    return head_v_dim


def _default_head_dim(hidden_size, num_heads, head_dim, fraction):
    if head_dim is not None:
        return head_dim
    _check_layer_args(hidden_size, num_heads, 1, "chunk")
    return max(1, int(hidden_size * fraction) // num_heads)


class _LinearMixerLayer(nn.Module):
    """Shared plumbing: projections, short convolutions, state handling, output norm and gate.
    `num_kv_heads` (default num_heads, must divide it): grouped-query heads: keys, values, decay gates,
    beta and the recurrent state `(B, num_kv_heads, D_k, D_v)` have num_kv_heads heads; queries, the
    output norm and gate have num_heads."""

    delta = False

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, head_v_dim: int, mode: str,
                 use_short_conv: bool, conv_size: int, chunk_size: int, norm_eps: float,
                 gate_activation: str, num_kv_heads: int):
        super().__init__()
        _check_layer_args(hidden_size, num_heads, head_dim, mode)
        self.hidden_size, self.num_heads, self.head_dim, self.head_v_dim = hidden_size, num_heads, head_dim, head_v_dim
        self.num_kv_heads = num_kv_heads
        self.key_dim, self.value_dim = num_heads * head_dim, num_heads * head_v_dim          # queries, output
        self.kv_key_dim, self.kv_value_dim = num_kv_heads * head_dim, num_kv_heads * head_v_dim  # keys, values, gates
        self.mode, self.chunk_size = mode, chunk_size
        self.use_short_conv, self.conv_size = use_short_conv, conv_size
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, self.kv_key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, self.kv_value_dim, bias=False)
        if use_short_conv:
            self.q_conv = ShortConvolution(self.key_dim, conv_size)
            self.k_conv = ShortConvolution(self.kv_key_dim, conv_size)
            self.v_conv = ShortConvolution(self.kv_value_dim, conv_size)
        self.o_norm = GatedRMSNorm(head_v_dim, eps=norm_eps, activation=gate_activation)
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    # subclasses: `op` (the anyattn.linear function), gates(x) -> its arguments after q, k, v (a tuple,
    # head-major layout), output_gate(x) -> (B, T, value_dim) or None (no gate: plain RMSNorm);
    # optionally key_value_heads(k, v).
    op = None

    def gates(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def output_gate(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def key_value_heads(self, k, v):
        """k `(B, num_kv_heads, T, D_k)`, v likewise: the layout `op` takes."""
        return k, v

    def _heads(self, x, d):
        B, T, _ = x.shape
        return x.reshape(B, T, -1, d).transpose(1, 2)                    # (B, H, T, d)

    def forward(self, x: torch.Tensor, state: dict | None = None, use_cache: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, hidden_size={self.hidden_size}), got {shape}")
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"state must be a dict returned by forward(..., use_cache=True) or None, "
                            f"got {type(state).__name__}")
        cp = context_parallel()                    # anyattn.distributed.context_parallel: this rank's rows
        if cp is not None:
            cp.refuse_cache(self, state, use_cache)
        state = state or {}
        conv_cache = state.get("conv") or (None, None, None)
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        new_conv = None
        if self.use_short_conv and cp is not None:
            q, k, v = (cp.conv(lambda t, h, c=c: c(t, h)[0], t, self.conv_size)
                       for c, t in ((self.q_conv, q), (self.k_conv, k), (self.v_conv, v)))
        elif self.use_short_conv:
            q, cq = self.q_conv(q, conv_cache[0])
            k, ck = self.k_conv(k, conv_cache[1])
            v, cv = self.v_conv(v, conv_cache[2])
            new_conv = (cq, ck, cv)
        elif self.delta:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        q, k, v = self._heads(q, self.head_dim), self._heads(k, self.head_dim), self._heads(v, self.head_v_dim)
        if self.delta:
            q, k = F.normalize(q, p=2, dim=-1), F.normalize(k, p=2, dim=-1)
        k, v = self.key_value_heads(k, v)
        kw = dict(initial_state=state.get("recurrent"), output_final_state=cp is None, mode=self.mode)
        if self.mode == "chunk":
            kw["chunk_size"] = self.chunk_size
        if cp is None:
            o, S = self.op(q, k, v, *self.gates(x), **kw)
        else:
            o, S = cp.linear(self.op, q, k, v, *self.gates(x), **kw), None
        o = o.transpose(1, 2)                                             # (B, T, H, D_v)
        gate = self.output_gate(x)
        gate = None if gate is None else gate.reshape(*o.shape)
        o = self.o_norm(o, gate).reshape(x.shape[0], x.shape[1], self.value_dim)
        y = self.o_proj(o)
        new_state = {"recurrent": S, "conv": new_conv} if use_cache else None
        return y, new_state


class GLALayer(_LinearMixerLayer):
    """Gated Linear Attention layer (Yang et al., 2024, "Gated Linear Attention Transformers with
    Hardware-Efficient Training"), as fla's `GatedLinearAttention`: `head_dim` is D_k (default
    hidden_size * 0.5 / num_heads, fla's expand_k = 0.5); the value width is hidden_size * expand_v
    (fla's expand_v = 1), D_v = hidden_size * expand_v / num_heads."""

    op = staticmethod(_L.gla)

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, mode: str = "chunk", *,
                 expand_v: float = 1.0, use_short_conv: bool = False, conv_size: int = 4,
                 gate_low_rank_dim: int = 16, gate_logit_normalizer: float = 16.0, chunk_size: int = 64,
                 norm_eps: float = 1e-5, num_kv_heads: int | None = None):
        head_dim = _default_head_dim(hidden_size, num_heads, head_dim, 0.5)
        _check_layer_args(hidden_size, num_heads, head_dim, mode)
        if isinstance(expand_v, bool) or not isinstance(expand_v, (int, float)):
            raise TypeError(f"expand_v must be a float, got {type(expand_v).__name__}")
        head_v_dim = round(hidden_size * expand_v / num_heads)
        if head_v_dim < 1 or not math.isclose(hidden_size * expand_v, num_heads * head_v_dim):
            raise ValueError(f"hidden_size * expand_v must be a positive multiple of num_heads={num_heads}, "
                             f"got {hidden_size} * {expand_v!r}")
        super().__init__(hidden_size, num_heads, head_dim, head_v_dim, mode, use_short_conv,
                         conv_size, chunk_size, norm_eps, "swish", _kv_heads(num_heads, num_kv_heads))
        self.gate_logit_normalizer = gate_logit_normalizer
        self.gk_proj = nn.Sequential(nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
                                     nn.Linear(gate_low_rank_dim, self.kv_key_dim, bias=True))
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)

    def gates(self, x):
        gk = F.logsigmoid(_up(self.gk_proj(x))) / self.gate_logit_normalizer
        return (self._heads(gk, self.head_dim),)

    def output_gate(self, x):
        return self.g_proj(x)



class GatedDeltaNetLayer(_LinearMixerLayer):
    """Gated DeltaNet layer (Yang, Kautz, Hatamizadeh, 2025, "Gated Delta Networks: Improving Mamba2
    with Delta Rule"). `head_dim` is D_k; D_v = head_dim * expand_v (published: 2). `use_gate=False`
    (fla's option, the setting of Zoology's MQAR configs): no output gate, `y = o_proj(RMSNorm(o))`."""

    delta = True
    op = staticmethod(_L.gated_delta_rule)

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, mode: str = "chunk", *,
                 expand_v: float = 2.0, use_short_conv: bool = True, conv_size: int = 4,
                 allow_neg_eigval: bool = False, chunk_size: int = 64, norm_eps: float = 1e-5,
                 num_kv_heads: int | None = None, use_gate: bool = True):
        if not isinstance(use_gate, bool):
            raise TypeError(f"use_gate must be a bool, got {type(use_gate).__name__}")
        head_dim = _default_head_dim(hidden_size, num_heads, head_dim, 0.75)
        super().__init__(hidden_size, num_heads, head_dim, _head_v_dim(head_dim, expand_v), mode, use_short_conv,
                         conv_size, chunk_size, norm_eps, "swish", _kv_heads(num_heads, num_kv_heads))
        self.allow_neg_eigval = allow_neg_eigval
        _init_scalar_decay_gates(self, hidden_size, self.num_kv_heads)
        self.use_gate = use_gate
        if use_gate:
            self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)

    def gates(self, x):
        g, beta = _scalar_decay_gates(self, x)
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return g.transpose(1, 2), beta.transpose(1, 2)                            # (B, H, T)

    def output_gate(self, x):
        return self.g_proj(x) if self.use_gate else None



class KDALayer(_LinearMixerLayer):
    """Kimi Delta Attention layer (Kimi Team, 2025, "Kimi Linear: An Expressive, Efficient Attention
    Architecture"). `head_dim` is D_k; D_v = head_dim * expand_v."""

    delta = True
    op = staticmethod(_L.kda)

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, mode: str = "chunk", *,
                 expand_v: float = 1.0, use_short_conv: bool = True, conv_size: int = 4,
                 allow_neg_eigval: bool = False, chunk_size: int = 64, norm_eps: float = 1e-5,
                 num_kv_heads: int | None = None):
        head_dim = _default_head_dim(hidden_size, num_heads, head_dim, 1.0)
        super().__init__(hidden_size, num_heads, head_dim, _head_v_dim(head_dim, expand_v), mode, use_short_conv,
                         conv_size, chunk_size, norm_eps, "sigmoid", _kv_heads(num_heads, num_kv_heads))
        self.allow_neg_eigval = allow_neg_eigval
        Hk = self.num_kv_heads
        self.f_proj = nn.Sequential(nn.Linear(hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.kv_key_dim, bias=False))
        self.b_proj = nn.Linear(hidden_size, Hk, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.empty(Hk).uniform_(1, 16)))
        self.dt_bias = nn.Parameter(_dt_bias(self.kv_key_dim))
        self.g_proj = nn.Sequential(nn.Linear(hidden_size, self.head_v_dim, bias=False),
                                    nn.Linear(self.head_v_dim, self.value_dim, bias=True))

    def gates(self, x):
        f = _up(self.f_proj(x)) + self.dt_bias
        B, T, _ = f.shape
        g = -_up(self.A_log).exp()[:, None] * F.softplus(f).reshape(B, T, self.num_kv_heads, self.head_dim)
        beta = torch.sigmoid(_up(self.b_proj(x)))
        if self.allow_neg_eigval:
            beta = beta * 2.0
        return g.transpose(1, 2), beta.transpose(1, 2)

    def output_gate(self, x):
        return self.g_proj(x)



class MoMLayer(_LinearMixerLayer):
    """Mixture-of-Memories layer (Du et al., 2025, "MoM: Linear Sequence Modeling with
    Mixture-of-Memories") with Gated DeltaNet memories. A router sends every token to `top_k` of
    `num_memories` memories (weights: softmax over the chosen logits); with `shared_memory=True` one
    more memory sees every token with weight 1. Each memory has its own key, value, decay and beta
    projections; the query, short convolutions, output norm and gate are those of GatedDeltaNetLayer.
    The state's `"recurrent"` is `(B, num_heads, M, D_k, D_v)` with M = num_memories (+ 1 shared)."""

    delta = True
    op = staticmethod(_L.mom)

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, mode: str = "chunk", *,
                 num_memories: int = 4, top_k: int = 2, shared_memory: bool = True, expand_v: float = 2.0,
                 use_short_conv: bool = True, conv_size: int = 4, chunk_size: int = 64, norm_eps: float = 1e-5):
        head_dim = _default_head_dim(hidden_size, num_heads, head_dim, 0.75)
        if isinstance(num_memories, bool) or not isinstance(num_memories, int) or num_memories < 1:
            raise ValueError(f"num_memories must be a positive int, got {num_memories!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_memories:
            raise ValueError(f"top_k must be an int in [1, num_memories={num_memories}], got {top_k!r}")
        if not isinstance(shared_memory, bool):
            raise TypeError(f"shared_memory must be a bool, got {type(shared_memory).__name__}")
        total = num_memories + int(shared_memory)
        super().__init__(hidden_size, num_heads, head_dim, _head_v_dim(head_dim, expand_v), mode, use_short_conv,
                         conv_size, chunk_size, norm_eps, "swish", num_heads * total)
        self.num_memories, self.top_k, self.shared_memory, self.total_memories = (
            num_memories, top_k, shared_memory, total)
        self.router = nn.Linear(hidden_size, num_memories, bias=False)
        _init_scalar_decay_gates(self, hidden_size, num_heads * total)   # one per (head, memory)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)

    def key_value_heads(self, k, v):
        B, _, T, _ = k.shape
        return (k.reshape(B, self.num_heads, self.total_memories, T, -1),
                v.reshape(B, self.num_heads, self.total_memories, T, -1))

    def routing(self, x):
        """Router weights `(B, T, M)`: softmax over the top_k logits, 0 elsewhere; 1 for the shared memory."""
        logits = _up(self.router(x))
        top = logits.topk(self.top_k, dim=-1)
        w = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        return torch.cat([w, torch.ones_like(w[..., :1])], -1) if self.shared_memory else w

    def gates(self, x):
        B, T, _ = x.shape
        g, beta = _scalar_decay_gates(self, x)

        def per_memory(t):                                            # (B, T, H * M) -> (B, H, M, T)
            return t.reshape(B, T, self.num_heads, self.total_memories).permute(0, 2, 3, 1)
        return per_memory(g), per_memory(beta), self.routing(x)

    def output_gate(self, x):
        return self.g_proj(x)


LINEAR_LAYERS = {"gla": GLALayer, "gated_deltanet": GatedDeltaNetLayer, "kda": KDALayer, "mom": MoMLayer}
