"""Registers the exact softmax engines (reference, sdpa, blocked) with the method registry."""
from __future__ import annotations

from ..reference import reference_attention
from ..registry import Method, Request, register
from .blocked import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q, blocked_attention
from .sdpa import lower, lse_supported, sdpa_attention


def _reference(req: Request):
    out, lse = reference_attention(req.q, req.k, req.v, req.mask, req.bias, req.scale, req.shape)
    return out, lse


def _sdpa_supports(req: Request):
    _, _, reason = lower(req.mask, req.bias, req.shape, check_only=True)
    if reason is None and req.return_lse and not lse_supported(req.q.device, req.q.dtype):
        reason = f"SDPA returns no LSE for {req.q.dtype} on {req.q.device.type} here"
    if reason is None and req.return_lse and req.bias is not None and \
            any(t.requires_grad for t in req.bias.tensors()):
        reason = ("SDPA's LSE path (the fused kernel called with its LSE) returns no gradient for the bias; "
                  "use 'blocked' or 'lowrank_bias'")
    return reason


def _sdpa(req: Request):
    attn_mask, is_causal, reason = lower(req.mask, req.bias, req.shape)
    if reason is not None:
        raise ValueError(f"method='sdpa' cannot run this request: {reason}")
    return sdpa_attention(req.q, req.k, req.v, attn_mask, is_causal, req.scale, req.shape, req.return_lse)


def _blocked(req: Request, block_q: int | None = None, block_k: int | None = None):
    from ..tune import measured_blocks
    from ..validate import check_positive_int
    if block_q is None or block_k is None:
        bq, bk = measured_blocks(req) or (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
        block_q = bq if block_q is None else block_q
        block_k = bk if block_k is None else block_k
    check_positive_int("block_q", block_q)
    check_positive_int("block_k", block_k)
    return blocked_attention(req.q, req.k, req.v, req.mask, req.bias, req.scale, req.shape, block_q, block_k)


register(Method("reference", True, "dense scores, the oracle (quadratic memory; exact in float64)",
                lambda req: None, _reference))
register(Method("sdpa", True, "torch scaled_dot_product_attention (no mask, causal, dense mask/bias); "
                "LSE on CPU via the flash op", _sdpa_supports, _sdpa))
register(Method("blocked", True, "FlashAttention-2 tiling in PyTorch ops: any mask/bias spec, tile skipping, "
                "O(N) memory forward and backward", lambda req: None, _blocked,
                {"block_q": f"query tile (default: measured by `anyattn tune` for the request's class, else "
                            f"{DEFAULT_BLOCK_Q})",
                 "block_k": f"key tile (default: measured by `anyattn tune`, else {DEFAULT_BLOCK_K})"}))
