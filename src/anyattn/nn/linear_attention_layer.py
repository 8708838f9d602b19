"""`LinearAttentionLayer`: the plain linear-attention layer of Katharopoulos et al. (2020, "Transformers are
RNNs"): q, k, v projections, `anyattn.linear.linear_attention` (feature map phi, default elu + 1, normalized
by `phi(q_t) . sum_{s<=t} phi(k_s)` by default), output projection. No gates, no short convolution, no
output norm: the baseline the gated and delta-rule layers improve on.

`forward(x (B, T, hidden_size), state=None, use_cache=False) -> (y, new_state)`; the state is
`{"recurrent": S (B, H, F, D_v [+ 1]) fp32, "position": int}` (F: the feature dim, + 1 value column holding
the normalizer with `normalize=True`), so decoding token by token equals the full forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import linear as _L
from ..linear.feature_maps import FEATURE_MAPS
from .linear_layers import _check_layer_args

# feature maps whose features depend on the token's position (continuations step token by token)
_POSITIONAL = ("cosformer",)


class LinearAttentionLayer(nn.Module):
    """Linear attention layer. hidden_size; num_heads H; head_dim D (default hidden_size // H);
    feature_map: a name in `anyattn.linear.feature_maps.FEATURE_MAPS` (or a callable / feature-map object);
    normalize: divide by the feature-space normalizer; feature_options: keyword arguments of the named map
    (e.g. `{"num_features": 64, "seed": 0}` for performer, `{"max_len": 4096}` for cosformer); mode "chunk" |
    "recurrent"; chunk_size; eps: added to the normalizer; bias: projection biases."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, *,
                 feature_map="elu1", normalize: bool = True, feature_options: dict | None = None,
                 mode: str = "chunk", chunk_size: int = 64, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        if head_dim is None:
            _check_layer_args(hidden_size, num_heads, 1, mode)
            head_dim = max(1, hidden_size // num_heads)
        _check_layer_args(hidden_size, num_heads, head_dim, mode)
        if isinstance(feature_map, str) and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)} or a callable, got {feature_map!r}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        if feature_options is not None and not isinstance(feature_options, dict):
            raise TypeError(f"feature_options must be a dict or None, got {type(feature_options).__name__}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.feature_map, self.normalize, self.feature_options = feature_map, normalize, feature_options
        self.mode, self.chunk_size, self.eps = mode, chunk_size, eps
        inner = num_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=bias) for _ in range(3))
        self.o_proj = nn.Linear(inner, hidden_size, bias=bias)

    def _heads(self, t):
        B, T, _ = t.shape
        return t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: dict | None = None, use_cache: bool = False):
        """x `(B, T, hidden_size)` -> `(y (B, T, hidden_size), new_state)` (None unless use_cache)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.hidden_size:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape (B, T, hidden_size={self.hidden_size}), got {shape}")
        if state is not None and (not isinstance(state, dict) or "recurrent" not in state):
            raise TypeError(f"state must be None or the dict forward(..., use_cache=True) returned, "
                            f"got {type(state).__name__}")
        B, T, _ = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        S = None if state is None else state["recurrent"]
        pos = 0 if state is None else state["position"]
        kw = dict(feature_map=self.feature_map, normalize=self.normalize, feature_options=self.feature_options,
                  eps=self.eps)
        if S is not None and (T == 1 or self.feature_map in _POSITIONAL):
            outs = []
            for t in range(T):
                o_t, S = _L.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], S, position=pos + t, **kw)
                outs.append(o_t)
            o = torch.stack(outs, 2)
        else:
            o, S = _L.linear_attention(q, k, v, initial_state=S, output_final_state=True, mode=self.mode,
                                       chunk_size=self.chunk_size, **kw)
        y = self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))
        return y, ({"recurrent": S, "position": pos + T} if use_cache else None)
