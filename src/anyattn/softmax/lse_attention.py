"""`attention_lse`: exact attention with its log-sum-exp for engines that merge partial attentions
(Combiner, local + global): torch SDPA where it returns a differentiable LSE (the CPU flash op), else the
`blocked` engine with the same mask."""
from __future__ import annotations

from ..masks import Causal, Dense
from ..validate import Shape
from .blocked import blocked_attention
from .sdpa import lse_supported, sdpa_attention


def attention_lse(q, k, v, mask, is_causal: bool, scale: float, shape: Shape):
    """q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`; mask: None or a bool tensor
    broadcastable to `(B, H, N_q, N_k)` (True = attend); is_causal: top-left causal (N_q == N_k here).
    Returns `(out, lse)`; rows with no allowed key give 0 and -inf."""
    if lse_supported(q.device):
        return sdpa_attention(q, k, v, mask, is_causal, scale, shape, True)
    spec = None if mask is None else Dense(mask)
    if is_causal:
        spec = Causal("top_left") if spec is None else spec & Causal("top_left")
    return blocked_attention(q, k, v, spec, None, scale, shape)
