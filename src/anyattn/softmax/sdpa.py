"""Route to `torch.nn.functional.scaled_dot_product_attention` when the request is expressible there:
no mask, causal in either alignment, a dense bool mask, and (issue "bias") a dense additive bias.

LSE: on CPU, `torch.ops.aten._scaled_dot_product_flash_attention_for_cpu` returns it; its autograd
formula ignores the LSE's gradient, so `_FlashCPU` calls the op's backward itself and folds the LSE
gradient in exactly (see `_FlashCPU.backward`). On other devices `sdpa` cannot return the LSE here
(the CUDA ops that return it are not exercised without a GPU) and says so; `auto` then uses `blocked`.

Fully masked query rows return 0 and LSE -inf, as everywhere in anyattn.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..lse import NEG_INF
from ..masks import Causal, Dense, Mask
from ..validate import Shape


def lower(mask: Mask | None, bias, shape: Shape, check_only: bool = False):
    """Translate specs to SDPA arguments. Returns `(attn_mask, is_causal, reason)`: attn_mask is None,
    a bool tensor or a float tensor; reason is None when expressible, else why not. Any bias spec is
    expressible: analytic ones are materialized with `bias.dense(N_q, N_k)` unless `check_only` (then
    attn_mask is not meaningful: use it to ask whether the request is expressible without the cost)."""
    attn_mask, is_causal = None, False
    if mask is None:
        pass
    elif isinstance(mask, Causal):
        top_left = mask.align == "top_left" or shape.N_q == shape.N_k
        if top_left:
            is_causal = True
        elif shape.N_q == 1:
            pass  # the single (last) query sees every key
        else:
            attn_mask = mask.dense(shape.B, shape.H, shape.N_q, shape.N_k, None)
    elif isinstance(mask, Dense):
        attn_mask = mask.mask
    else:
        return None, False, f"mask {mask!r} has no SDPA form (only causal and dense masks do)"
    if bias is not None:
        from ..biases import Dense as DenseBias
        if check_only and not isinstance(bias, DenseBias):
            return attn_mask, is_causal, None
        # A dense bias is used as is; an analytic spec is materialized (quadratic memory; differentiable
        # in its parameters). `plan.choose` only routes analytic biases here when that is small.
        b = bias._4d(bias.bias) if isinstance(bias, DenseBias) else bias.dense(shape.N_q, shape.N_k)
        if is_causal:
            attn_mask = Causal("top_left").dense(1, 1, shape.N_q, shape.N_k, b.device)
            is_causal = False
        attn_mask = b if attn_mask is None else b.masked_fill(~attn_mask.to(b.device), NEG_INF)
    return attn_mask, is_causal, None


def _pad_last(x: torch.Tensor, width: int) -> torch.Tensor:
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def _empty_rows(attn_mask, is_causal, shape: Shape):
    """Bool `(B|1, H|1, N_q, 1)` of rows with no allowed key, or None when there can be none."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return ~attn_mask.any(dim=-1, keepdim=True)
    return (attn_mask == NEG_INF).all(dim=-1, keepdim=True)


def _float_mask(attn_mask, dtype):
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return None if attn_mask is None else attn_mask.to(dtype)
    return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill_(~attn_mask, NEG_INF)


class _FlashCPU(torch.autograd.Function):
    """CPU flash attention with a differentiable LSE. Inputs share one head dim W (zero-padded)."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, d_v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse, attn_mask)
        ctx.is_causal, ctx.scale, ctx.d_v = is_causal, scale, d_v
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _flash_backward(q, k, v, out, lse, dout, dlse, attn_mask, ctx.is_causal, ctx.scale, ctx.d_v)
        return dq, dk, dv, None, None, None, None


def _flash_backward(q, k, v, out, lse, dout, dlse, attn_mask, is_causal, scale, d_v):
    """The CPU flash backward with the LSE's gradient folded in. q, k, v, out, dout share one head dim W
    (zero-padded); `d_v` is v's true head dim. Returns (dq, dk, dv) of width W."""
    if dlse is not None:
        # d lse_i / d s_ij = p_ij, i.e. ds_ij = p_ij (dp_ij - delta_i + dlse_i). Append a value
        # column of ones (dp gains dlse_i) whose output column is reported as 0 (delta unchanged).
        W, dv_ = q.shape[-1], d_v
        Wa = max(W, dv_ + 1)
        col = torch.zeros(v.shape[:-1] + (1,), dtype=v.dtype, device=v.device)
        v_aug = torch.cat([v[..., :dv_], col + 1, torch.zeros(v.shape[:-1] + (Wa - dv_ - 1,), dtype=v.dtype,
                                                             device=v.device)], -1)
        o_aug = _pad_last(out[..., :dv_], Wa)
        do_aug = torch.cat([dout[..., :dv_], dlse.unsqueeze(-1).to(dout.dtype),
                            torch.zeros(dout.shape[:-1] + (Wa - dv_ - 1,), dtype=dout.dtype, device=dout.device)], -1)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do_aug, _pad_last(q, Wa), _pad_last(k, Wa), v_aug, o_aug, lse, 0.0, is_causal,
            attn_mask=attn_mask, scale=scale)
        return dq[..., :W], dk[..., :W], _pad_last(dv[..., :dv_], W)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


def flash_block_forward(q, k, v, is_causal: bool, scale: float):
    """CPU flash attention of one block, without autograd, for callers that merge blocks by LSE
    (`anyattn.distributed`). q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`; no mask or a
    top-left causal one with `N_q <= N_k` (no empty row). Returns out `(B, H, N_q, D_v)`, lse `(B, H, N_q)`."""
    G, d_v = q.shape[1] // k.shape[1], v.shape[-1]
    W = max(q.shape[-1], d_v)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _pad_last(q, W), _pad_last(k, W), _pad_last(v, W), 0.0, is_causal, scale=scale)
    return out[..., :d_v], lse


def flash_block_backward(q, k, v, out, lse, dout, dlse, is_causal: bool, scale: float):
    """Gradients `(dq, dk, dv)` of one block given the rows' *final* `out` and `lse` over all key blocks
    (FlashAttention's backward needs nothing else: `p = exp(s - lse)` is the global probability and
    `delta = rowsum(dout * out) - dlse`). Shapes as in `flash_block_forward`; dlse may be None."""
    G, D, d_v = q.shape[1] // k.shape[1], q.shape[-1], v.shape[-1]
    W = max(D, d_v)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    dq, dk, dv = _flash_backward(_pad_last(q, W), _pad_last(k, W), _pad_last(v, W), _pad_last(out, W),
                                 lse, _pad_last(dout, W), dlse, None, is_causal, scale, d_v)
    dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :d_v]
    if G > 1:
        dk = dk.unflatten(1, (-1, G)).sum(2)
        dv = dv.unflatten(1, (-1, G)).sum(2)
    return dq, dk, dv


def lse_supported(device: torch.device) -> bool:
    return device.type == "cpu"


def sdpa_attention(q, k, v, attn_mask, is_causal: bool, scale: float, shape: Shape, return_lse: bool):
    """Run the lowered request through torch SDPA. Returns `(out, lse or None)`."""
    G = shape.groups
    empty = _empty_rows(attn_mask, is_causal, shape)
    if not return_lse:
        W = max(shape.D, shape.D_v)
        if q.device.type == "cpu" and shape.D != shape.D_v:
            # CPU SDPA leaves its flash path when v's head dim differs: pad all three to one width.
            out = F.scaled_dot_product_attention(_pad_last(q, W), _pad_last(k, W), _pad_last(v, W),
                                                 attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                 enable_gqa=G > 1)[..., :shape.D_v]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                                 scale=scale, enable_gqa=G > 1)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return out, None
    if not lse_supported(q.device):
        raise ValueError(f"method='sdpa' cannot return the LSE on device {q.device.type!r}; "
                         "use method='blocked' (or 'auto') with return_lse=True")
    W = max(shape.D, shape.D_v)
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    fmask = _float_mask(attn_mask, q.dtype)
    if fmask is not None:
        fmask = fmask.expand(shape.B, shape.H, shape.N_q, shape.N_k)
    out, lse = _FlashCPU.apply(_pad_last(q, W), _pad_last(k, W), _pad_last(v, W), fmask, is_causal, scale, shape.D_v)
    out = out[..., :shape.D_v]
    if empty is not None:
        e = empty.expand(shape.B, shape.H, shape.N_q, 1)
        out = out.masked_fill(e, 0.0)
        lse = lse.masked_fill(e.squeeze(-1), NEG_INF)
    return out, lse
