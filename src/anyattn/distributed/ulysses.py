"""Ulysses attention (Jacobs et al., "DeepSpeed Ulysses", 2023): an all-to-all turns the sequence-sharded
`(B, H, n_local, D)` tensors into head-sharded `(B, H / W, N, D)` ones, each rank runs the unsharded
attention on its heads (the best single-process engine, `anyattn.attention` with method "auto"), and an
all-to-all turns the output back. Needs `H % W == 0`; K/V heads are replicated when `H_kv` is not a
multiple of W (to `lcm(H_kv, W)` heads). Masks and biases are evaluated on global positions and on the
rank's global heads. Gradients flow through the differentiable all-to-alls.

Bytes per rank, forward (b(x) = bytes of the local tensor x, f the K/V replication factor):
`(W-1)/W * (b(q) + f * (b(k) + b(v)) + b(out))` (+ the LSE when returned); backward the same again.
"""
from __future__ import annotations

import math

import torch

from .. import masks as M
from ..subblock import BlockBias, BlockMask, GlobalSpans, Run


def kv_replication(H_kv: int, W: int) -> int:
    """Factor by which K/V heads are repeated so that they split evenly over W ranks."""
    return W // math.gcd(H_kv, W)


def _head_free(mask) -> bool:
    """True when the mask does not depend on the head (then it is passed to the engine unchanged)."""
    if mask is None or isinstance(mask, (M.Causal, M.SlidingWindow, M.KeyPadding, M.Document, M.Neighborhood)):
        return True
    if isinstance(mask, M.Dense):
        return mask.mask.shape[1] == 1
    if isinstance(mask, (M.And, M.Or)):
        return _head_free(mask.a) and _head_free(mask.b)
    return False


def ulysses_attention(comm, layout, q, k, v, mask, bias, scale, return_lse, method="auto"):
    from ..api import attention as local_attention
    W, r = comm.world_size, comm.rank
    B, H, n, D = q.shape
    N = layout.n_global
    f = kv_replication(k.shape[1], W)
    if f > 1:
        k, v = k.repeat_interleave(f, 1), v.repeat_interleave(f, 1)
    D_v = v.shape[-1]
    qh = comm.all_to_all(q, split_dim=1, cat_dim=2)  # (B, H/W, N, D), rows in layout order
    kvh = comm.all_to_all(torch.cat([k, v], -1), split_dim=1, cat_dim=2)
    order = None
    if layout.kind != "contiguous":
        order = torch.cat([layout.positions(s, q.device) for s in range(W)])  # row -> global position
        to_global = torch.argsort(order)
        qh, kvh = qh.index_select(2, to_global), kvh.index_select(2, to_global)
    heads = (r * H // W, (r + 1) * H // W)
    spec_mask, spec_bias = mask, bias
    if W > 1 and not _head_free(mask):
        spec_mask = BlockMask(mask, Run(0, N, 1), Run(0, N, 1), B, H, N, N, heads, GlobalSpans(mask, N, N, 256))
    if W > 1 and bias is not None:
        spec_bias = BlockBias(bias, Run(0, N, 1), Run(0, N, 1), B, H, N, N, heads, q.device)
    out, lse = local_attention(qh, kvh[..., :D], kvh[..., D:], mask=spec_mask, bias=spec_bias, scale=scale,
                               method=method, return_lse=True)
    if return_lse:
        out = torch.cat([out.to(lse.dtype), lse.unsqueeze(-1)], -1)
    if order is not None:
        out = out.index_select(2, order)
    out = comm.all_to_all(out, split_dim=2, cat_dim=1)  # (B, H, n, ...)
    if return_lse:
        return out[..., :D_v].to(q.dtype), out[..., D_v]
    return out, None
