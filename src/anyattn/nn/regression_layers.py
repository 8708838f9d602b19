"""Attention layers of the local-regression family (Zuo et al., 2025): `LocalLinearAttentionLayer`
(`anyattn.local_linear_attention`) and `ParallaxLayer` (`anyattn.parallax_attention`, with a probe
projection r = W_r x). Both are causal, with q, k, v (, r) and output projections, and follow
`forward(x (B, T, hidden), state=None, use_cache=False) -> (y, new_state)`: the state holds every key
and value so far (`{"k", "v"}`, `(B, H, L, D)`), so decoding one token at a time equals the full forward
(causal masks align bottom-right)."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..masks import Causal
from ..softmax.local_linear import local_linear_attention
from ..softmax.parallax import parallax_attention
from .linear_layers import _check_layer_args
from .memory_layers import _check_state, _check_x, _heads, _merge_heads


class _CachedAttentionLayer(nn.Module):
    probe = False

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int | None, bias: bool):
        super().__init__()
        head_dim = head_dim if head_dim is not None else max(1, hidden_size // max(1, num_heads))
        _check_layer_args(hidden_size, num_heads, head_dim, "chunk")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        inner = num_heads * head_dim
        names = ("q_proj", "k_proj", "v_proj") + (("r_proj",) if self.probe else ())
        for name in names:
            setattr(self, name, nn.Linear(hidden_size, inner, bias=bias))
        self.o_proj = nn.Linear(inner, hidden_size, bias=bias)

    def mix(self, q, k, v, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden_size)
        state = _check_state(state)
        q, k, v = (_heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if state.get("k") is not None:
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        o = self.mix(q, k, v, x)
        return self.o_proj(_merge_heads(o)), ({"k": k, "v": v} if use_cache else None)


class LocalLinearAttentionLayer(_CachedAttentionLayer):
    """Causal Local Linear Attention layer: ridge `lam`, `mode` ("auto" | "dense" | "blocked") and the
    conjugate-gradient settings of `anyattn.local_linear_attention`."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, *, lam: float = 10.0,
                 mode: str = "auto", cg_iters: int = 16, bias: bool = False):
        super().__init__(hidden_size, num_heads, head_dim, bias)
        self.lam, self.mode, self.cg_iters = lam, mode, cg_iters

    def mix(self, q, k, v, x):
        return local_linear_attention(q, k, v, lam=self.lam, mode=self.mode, cg_iters=self.cg_iters)


class ParallaxLayer(_CachedAttentionLayer):
    """Causal Parallax layer: softmax attention corrected along a learned probe r = W_r x."""

    probe = True

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, *, bias: bool = False):
        super().__init__(hidden_size, num_heads, head_dim, bias)

    def mix(self, q, k, v, x):
        return parallax_attention(q, k, v, _heads(self.r_proj(x), self.head_dim), mask=Causal())


REGRESSION_LAYERS = {"local_linear": LocalLinearAttentionLayer, "parallax": ParallaxLayer}
