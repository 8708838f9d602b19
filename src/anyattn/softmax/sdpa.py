"""Route to `torch.nn.functional.scaled_dot_product_attention` when the request is expressible there:
no mask, causal in either alignment, a dense bool mask, and (issue "bias") a dense additive bias.

LSE: a fused kernel that returns it, per device: on CPU `aten._scaled_dot_product_flash_attention_for_cpu`
(every float dtype), on CUDA `aten._scaled_dot_product_efficient_attention` (fp32/bf16/fp16; it takes the
float bias too). Their autograd formulas ignore the LSE's gradient, so `_FusedLSE` calls the kernel's
backward itself and folds the LSE gradient in exactly (see `_FusedLSE`). Elsewhere (and for float64 on
CUDA) `sdpa` returns no LSE and says so; `auto` then uses another method. The CUDA path is checked for
shapes on the `meta` device here and against the oracle by `scripts/gpu-check.sh` on a GPU.

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


def _round8(n: int) -> int:
    return -(-n // 8) * 8


class _CpuFlash:
    """CPU: `_scaled_dot_product_flash_attention_for_cpu` (any float dtype, float attn_mask)."""

    width = staticmethod(lambda w: w)

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
        return out, lse, lse, ()

    @staticmethod
    def backward(dout, q, k, v, out, lse_raw, extra, attn_mask, is_causal, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse_raw, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


class _CudaEfficient:
    """CUDA (and `meta`, for shape checks): the memory-efficient kernel, which takes a float bias and
    returns the LSE (padded to a multiple of 32 queries); fp32/bf16/fp16. Head dims are padded to a
    multiple of 8 and a bias's last dim is stored with a stride that is a multiple of 16 (its alignment
    rules)."""

    width = staticmethod(_round8)

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        if attn_mask is not None:
            n_k = attn_mask.shape[-1]
            pad = -n_k % 16
            attn_mask = F.pad(attn_mask, (0, pad))[..., :n_k] if pad else attn_mask.contiguous()
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, attn_mask, True, 0.0, is_causal, scale=scale)
        return out, lse[..., :q.shape[-2]], lse, (seed, offset, attn_mask)

    @staticmethod
    def backward(dout, q, k, v, out, lse_raw, extra, attn_mask, is_causal, scale):
        seed, offset, aligned_mask = extra
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, k, v, aligned_mask, out, lse_raw, seed, offset, 0.0, [True, True, True, False],
            is_causal, scale=scale)
        return dq, dk, dv


_LSE_KERNELS = {"cpu": _CpuFlash, "cuda": _CudaEfficient, "meta": _CudaEfficient}
_LSE_DTYPES = {"cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
               "cuda": (torch.float32, torch.bfloat16, torch.float16),
               "meta": (torch.float32, torch.bfloat16, torch.float16)}


class _FusedLSE(torch.autograd.Function):
    """A fused SDPA kernel with a differentiable LSE. Inputs share one head dim W (zero-padded).

    The kernels' autograd formulas ignore the LSE's gradient, so the backward calls the kernel's
    backward itself and folds it in exactly: d lse_i / d s_ij = p_ij, i.e. ds_ij = p_ij (dp_ij - delta_i
    + dlse_i); a value column of ones makes dp gain dlse_i, and its output column is reported as 0 so
    delta is unchanged. Rows without keys (LSE -inf) recompute with LSE +inf: their probabilities and
    gradients are 0."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, d_v):
        kern = _LSE_KERNELS[q.device.type]
        out, lse, lse_raw, extra = kern.forward(q, k, v, attn_mask, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse_raw, attn_mask)
        ctx.extra, ctx.kern = extra, kern
        ctx.is_causal, ctx.scale, ctx.d_v = is_causal, scale, d_v
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse_raw, attn_mask = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = _fused_backward(ctx.kern, q, k, v, out, lse_raw, ctx.extra, dout, dlse, attn_mask,
                                     ctx.is_causal, ctx.scale, ctx.d_v)
        return dq, dk, dv, None, None, None, None


def _fused_backward(kern, q, k, v, out, lse_raw, extra, dout, dlse, attn_mask, is_causal, scale, d_v):
    """The kernel's backward with the LSE's gradient folded in (see `_FusedLSE`). q, k, v, out, dout share
    one head dim W (zero-padded); `d_v` is v's true head dim. Returns (dq, dk, dv) of width W."""
    lse_raw = lse_raw.masked_fill(lse_raw == NEG_INF, float("inf"))
    if dlse is None:
        return kern.backward(dout, q, k, v, out, lse_raw, extra, attn_mask, is_causal, scale)
    W, dv_ = q.shape[-1], d_v
    Wa = kern.width(max(W, dv_ + 1))

    def widen(x, col):  # x[..., :dv_], then the extra column, then zeros up to Wa
        parts = [x[..., :dv_], col, x.new_zeros(x.shape[:-1] + (Wa - dv_ - 1,))]
        return torch.cat(parts, -1)
    ones = v.new_ones(v.shape[:-1] + (1,))
    v_aug = widen(v, ones)
    o_aug = widen(out, out.new_zeros(out.shape[:-1] + (1,)))
    do_aug = widen(dout, dlse.unsqueeze(-1).to(dout.dtype))
    dq, dk, dv = kern.backward(do_aug, _pad_last(q, Wa), _pad_last(k, Wa), v_aug, o_aug, lse_raw, extra,
                               attn_mask, is_causal, scale)
    return dq[..., :W], dk[..., :W], _pad_last(dv[..., :dv_], W)


def flash_block_forward(q, k, v, is_causal: bool, scale: float):
    """CPU flash attention of one block, without autograd, for callers that merge blocks by LSE
    (`anyattn.distributed`). q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`; no mask or a
    top-left causal one with `N_q <= N_k` (no empty row). Returns out `(B, H, N_q, D_v)`, lse `(B, H, N_q)`."""
    G, d_v = q.shape[1] // k.shape[1], v.shape[-1]
    W = max(q.shape[-1], d_v)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    out, lse, _, _ = _CpuFlash.forward(_pad_last(q, W), _pad_last(k, W), _pad_last(v, W), None, is_causal, scale)
    return out[..., :d_v], lse


def flash_block_backward(q, k, v, out, lse, dout, dlse, is_causal: bool, scale: float):
    """Gradients `(dq, dk, dv)` of one block given the rows' *final* `out` and `lse` over all key blocks
    (FlashAttention's backward needs nothing else: `p = exp(s - lse)` is the global probability and
    `delta = rowsum(dout * out) - dlse`). Shapes as in `flash_block_forward`; dlse may be None."""
    G, D, d_v = q.shape[1] // k.shape[1], q.shape[-1], v.shape[-1]
    W = max(D, d_v)
    if G > 1:
        k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    dq, dk, dv = _fused_backward(_CpuFlash, _pad_last(q, W), _pad_last(k, W), _pad_last(v, W), _pad_last(out, W),
                                 lse, (), _pad_last(dout, W), dlse, None, is_causal, scale, d_v)
    dq, dk, dv = dq[..., :D], dk[..., :D], dv[..., :d_v]
    if G > 1:
        dk = dk.unflatten(1, (-1, G)).sum(2)
        dv = dv.unflatten(1, (-1, G)).sum(2)
    return dq, dk, dv


def lse_supported(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether `sdpa` returns a differentiable LSE for inputs on `device` (of `dtype`): the CPU flash op
    (every float dtype), the CUDA memory-efficient kernel (fp32/bf16/fp16)."""
    dtypes = _LSE_DTYPES.get(torch.device(device).type)
    return dtypes is not None and (dtype is None or dtype in dtypes)


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
    if not lse_supported(q.device, q.dtype):
        raise ValueError(f"method='sdpa' cannot return the LSE for {q.dtype} on device {q.device.type!r}; "
                         "use method='blocked' (or 'auto') with return_lse=True")
    W = _LSE_KERNELS[q.device.type].width(max(shape.D, shape.D_v))
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    fmask = _float_mask(attn_mask, q.dtype)
    if fmask is not None:
        fmask = fmask.expand(shape.B, shape.H, shape.N_q, shape.N_k)
    out, lse = _FusedLSE.apply(_pad_last(q, W), _pad_last(k, W), _pad_last(v, W), fmask, is_causal, scale, shape.D_v)
    out = out[..., :shape.D_v]
    if empty is not None:
        e = empty.expand(shape.B, shape.H, shape.N_q, 1)
        out = out.masked_fill(e, 0.0)
        lse = lse.masked_fill(e.squeeze(-1), NEG_INF)
    return out, lse
