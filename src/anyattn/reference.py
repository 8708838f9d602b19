"""The dense oracle: materializes the `(B, H, N_q, N_k)` scores. Exact in float64; low-precision
inputs are computed in float32 and cast back. Gradients come from autograd and are finite for
fully masked rows (which return 0 with LSE -inf)."""
from __future__ import annotations

import torch

from .lse import NEG_INF
from .validate import Shape


def reference_attention(q, k, v, mask, bias, scale: float, shape: Shape):
    """q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> out `(B, H, N_q, D_v)`,
    lse `(B, H, N_q)`."""
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q, k, v = q.to(work), k.to(work), v.to(work)
    G = shape.groups
    if G > 1:
        k = k.repeat_interleave(G, dim=1)
        v = v.repeat_interleave(G, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.dense(shape.N_q, shape.N_k).to(work)
    if mask is not None:
        allowed = mask.dense(shape.B, shape.H, shape.N_q, shape.N_k, q.device).expand_as(s)
        s = s.masked_fill(~allowed, NEG_INF)
        row_any = allowed.any(dim=-1, keepdim=True)
        # All-masked rows: take the LSE of zeros (finite) so no -inf - -inf appears; zeroed below.
        lse = torch.logsumexp(torch.where(row_any, s, torch.zeros_like(s)), dim=-1, keepdim=True)
        p = torch.exp(s - lse)
        lse = torch.where(row_any, lse, torch.full_like(lse, NEG_INF))
    else:
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        p = torch.exp(s - lse)
    out = torch.matmul(p, v)
    return out.to(dtype), lse.squeeze(-1)
