"""`attention_lse`: exact attention with its log-sum-exp on the softmax engines, for code that merges
partial attentions (the approximations' exact pieces, Combiner, local + global): torch SDPA where the
mask lowers to it and a fused kernel returns a differentiable LSE on this device and dtype
(`sdpa.lse_supported`), else the `blocked` engine with the same mask."""
from __future__ import annotations

from ..validate import Shape
from .blocked import blocked_attention
from .sdpa import lower, lse_supported, sdpa_attention


def attention_lse(q, k, v, mask=None, scale: float | None = None, shape: Shape | None = None):
    """q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` with H_kv dividing H; mask: None or a
    `masks` spec (`Causal` and `Dense` lower to SDPA; any other runs on `blocked`); scale defaults to
    `D ** -0.5`; shape: the request's `Shape` when the caller has it. Returns `(out, lse)`; rows with no
    allowed key give 0 and -inf."""
    if shape is None:
        shape = Shape(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3])
    scale = shape.D ** -0.5 if scale is None else scale
    attn_mask, is_causal, reason = lower(mask, None, shape)
    if reason is None and lse_supported(q.device, q.dtype):
        return sdpa_attention(q, k, v, attn_mask, is_causal, scale, shape, True)
    return blocked_attention(q, k, v, mask, None, scale, shape)
