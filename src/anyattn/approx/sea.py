"""`sea`: estimated-mask sparse attention (training-free, after Lee et al., 2024, "SEA: Sparse Linear
Attention with Estimated Attention Mask", ICLR).

1. Estimate the attention map cheaply, per query and key block of `block_k` keys:
   - `estimate="pooled"` (default): a compressed score map of width `N_k / block_k`: scores against the
     block-mean keys, `scale q_i . mean(k_block) + log |block|`, softmax over the blocks;
   - `estimate="linear"`: the linear-attention (FAVOR+, `num_features`, `seed`) estimate of each block's
     attention mass `phi(q_i) . sum_{j in block} phi(k_j)`, normalized per query.
2. Choose a top-`budget` set of key blocks from the estimate. The per-query estimates are summed over
   each query block of `block_q` queries, so the queries of a block share their key blocks and exact
   attention runs as dense tiles (`block_q=1` gives a per-query choice, at a higher gather cost).
   Under a causal mask the diagonal key blocks are always chosen (every query keeps its own position).
3. Exact softmax attention on the chosen blocks only (one fused `sdpa`/`blocked` call with LSE over
   `(B*H, num_query_blocks)` batches), with the mask applied inside the chosen blocks.

When `budget * block_k >= N_k` every block is chosen and the result is exact. Masks: Causal (either
alignment) and KeyPadding are honoured; other masks and biases are refused. The returned LSE is the
exact LSE over the chosen keys (a lower bound of the full LSE).

Shapes: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(B, H, N_q, D_v)`.
"""
from __future__ import annotations

import math

import torch

from ..lse import NEG_INF
from ..masks import Causal, Dense
from ..registry import Method, Request, register
from ..softmax.lse_attention import attention_lse
from ._common import (SEED_DOC, check_choice, expand_kv, finish, key_lengths, pad_to,
                      positive_int, screen)
from .performer import favor_features, projection

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
DEFAULT_BUDGET = 16
DEFAULT_FEATURES = 64
QUERY_CHUNK = 4096


def _block_valid(n_k, nkb, bk, lengths, device):
    """`(B|1, nkb)` count of valid keys per block (padding beyond N_k and KeyPadding excluded)."""
    starts = torch.arange(nkb, device=device) * bk
    ends = torch.clamp(starts + bk, max=n_k)
    if lengths is None:
        return (ends - starts).view(1, nkb)
    lim = lengths.view(-1, 1)
    return (torch.minimum(ends.view(1, -1), lim) - torch.minimum(starts.view(1, -1), lim)).clamp_min(0)


def select_blocks(q, k, scale: float, *, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                  budget: int = DEFAULT_BUDGET, estimate: str = "pooled", num_features: int = DEFAULT_FEATURES,
                  seed=0, causal_offset: int | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The chosen key blocks `(B, H, num_query_blocks, min(budget, num_key_blocks))` (indices into blocks
    of `block_k` keys), from the estimate described in the module docstring. q, k with the same H."""
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    nqb, nkb = -(-N_q // block_q), -(-N_k // block_k)
    with torch.no_grad():
        count = _block_valid(N_k, nkb, block_k, lengths, q.device)  # (B|1, nkb)
        kp = pad_to(k, nkb * block_k, 2).reshape(B, H, nkb, block_k, D)
        if lengths is not None:
            keep = (torch.arange(nkb * block_k, device=q.device).view(1, -1) < lengths.view(-1, 1))
            kp = kp * keep.view(B, 1, nkb, block_k, 1).to(kp.dtype)
        cnt = count.view(count.shape[0], 1, nkb).to(q.dtype)
        if estimate == "pooled":
            kbar = kp.sum(3) / cnt.clamp_min(1).unsqueeze(-1)  # (B, H, nkb, D)
            logc = torch.where(cnt > 0, cnt.clamp_min(1).log(), torch.full_like(cnt, NEG_INF)).unsqueeze(-2)
        else:
            w = projection(D, num_features, seed, dtype=q.dtype, device=q.device)
            r = math.sqrt(scale)
            fk, _ = favor_features(kp.reshape(B, H, -1, D) * r, w, per_row=False)
            if lengths is not None:
                fk = fk * keep.view(B, 1, -1, 1).to(fk.dtype)
            else:
                fk = fk * (torch.arange(nkb * block_k, device=q.device) < N_k).view(1, 1, -1, 1).to(fk.dtype)
            fkb = fk.reshape(B, H, nkb, block_k, -1).sum(3)  # (B, H, nkb, m)
        pooled = torch.zeros(B, H, nqb, nkb, dtype=q.dtype, device=q.device)
        kb_start = torch.arange(nkb, device=q.device) * block_k
        for c0 in range(0, N_q, QUERY_CHUNK):
            c1 = min(N_q, c0 + QUERY_CHUNK)
            qc = q[:, :, c0:c1]
            if estimate == "pooled":
                logits = scale * qc @ kbar.transpose(-1, -2) + logc
            else:
                fq, _ = favor_features(qc * math.sqrt(scale), w, per_row=True)
                mass = fq @ fkb.transpose(-1, -2)
                logits = torch.where(mass > 0, mass.clamp_min(1e-30).log(), torch.full_like(mass, NEG_INF))
            if causal_offset is not None:
                qpos = torch.arange(c0, c1, device=q.device).view(-1, 1) + causal_offset
                logits = logits.masked_fill(kb_start.view(1, -1) > qpos, NEG_INF)
            lmax = logits.amax(-1, keepdim=True)
            lmax = torch.where(torch.isfinite(lmax), lmax, torch.zeros_like(lmax))
            est = torch.exp(logits - lmax)
            est = est / est.sum(-1, keepdim=True).clamp_min(1e-30)
            qb = torch.arange(c0, c1, device=q.device) // block_q
            pooled.index_add_(2, qb, est)
        score = torch.where(count.view(count.shape[0], 1, 1, nkb) > 0, pooled, torch.full_like(pooled, NEG_INF))
        if causal_offset is not None:
            q0 = torch.arange(nqb, device=q.device) * block_q
            q1 = torch.clamp(q0 + block_q, max=N_q) - 1
            allowed = kb_start.view(1, -1) <= (q1 + causal_offset).view(-1, 1)
            score = score.masked_fill(~allowed, NEG_INF)
            for pos in (q0 + causal_offset, q1 + causal_offset):  # diagonal blocks, always chosen
                blk = (pos // block_k).clamp(0, nkb - 1)
                ok = (pos >= 0).view(1, 1, -1, 1)
                force = torch.zeros(1, 1, nqb, nkb, dtype=torch.bool, device=q.device)
                force.scatter_(3, blk.view(1, 1, -1, 1), ok)
                score = torch.where(force & (score > NEG_INF), torch.full_like(score, float("inf")), score)
        sel = torch.topk(score, min(budget, nkb), dim=-1).indices
    return sel


def sea_attention(q, k, v, scale: float, sel: torch.Tensor, *, block_q: int, block_k: int,
                  causal_offset: int | None = None, lengths: torch.Tensor | None = None):
    """Exact attention of each query block over its chosen key blocks `sel (B, H, nqb, nsel)`.
    Returns `(out, lse)`."""
    B, H, N_q, D = q.shape
    N_k, D_v = k.shape[2], v.shape[-1]
    nqb, nsel = sel.shape[2], sel.shape[3]
    nkb = -(-N_k // block_k)
    kb = pad_to(k, nkb * block_k, 2).reshape(B, H, nkb, block_k * D)
    vb = pad_to(v, nkb * block_k, 2).reshape(B, H, nkb, block_k * D_v)
    flat = sel.reshape(B, H, nqb * nsel, 1)
    ks = torch.gather(kb, 2, flat.expand(-1, -1, -1, block_k * D)).reshape(B * H, nqb, nsel * block_k, D)
    vs = torch.gather(vb, 2, flat.expand(-1, -1, -1, block_k * D_v)).reshape(B * H, nqb, nsel * block_k, D_v)
    qs = pad_to(q, nqb * block_q, 2).reshape(B * H, nqb, block_q, D)
    pos = (sel.unsqueeze(-1) * block_k + torch.arange(block_k, device=q.device)).view(B, H, nqb, 1, nsel * block_k)
    need = causal_offset is not None or lengths is not None or nkb * block_k != N_k
    mask = None
    if need:
        allowed = pos < N_k
        if lengths is not None:
            allowed = allowed & (pos < lengths.view(B, 1, 1, 1, 1))
        if causal_offset is not None:
            qpos = (torch.arange(nqb * block_q, device=q.device) + causal_offset).view(1, 1, nqb, block_q, 1)
            allowed = allowed & (pos <= qpos)
        mask = Dense(allowed.expand(B, H, nqb, -1, -1).reshape(B * H, nqb, -1, nsel * block_k))
    out, lse = attention_lse(qs, ks, vs, mask=mask, scale=scale)
    out = out.reshape(B, H, nqb * block_q, D_v)[:, :, :N_q]
    lse = lse.reshape(B, H, nqb * block_q)[:, :, :N_q]
    return out, lse


def _supports(req: Request):
    return screen(req, "sea", causal=True, key_padding=True)


def _run(req: Request, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K, budget: int = DEFAULT_BUDGET,
         estimate: str = "pooled", num_features: int = DEFAULT_FEATURES, seed=0):
    for name, val in (("block_q", block_q), ("block_k", block_k), ("budget", budget), ("num_features", num_features)):
        positive_int(name, val)
    check_choice("estimate", estimate, ("pooled", "linear"))
    sh = req.shape
    q, k, v = expand_kv(req)
    off = req.mask.offset(sh.N_q, sh.N_k) if isinstance(req.mask, Causal) else None
    lengths = key_lengths(req.mask, sh.B, sh.N_k, q.device)
    sel = select_blocks(q, k, req.scale, block_q=block_q, block_k=block_k, budget=budget, estimate=estimate,
                        num_features=num_features, seed=seed, causal_offset=off, lengths=lengths)
    out, lse = sea_attention(q, k, v, req.scale, sel, block_q=block_q, block_k=block_k, causal_offset=off,
                             lengths=lengths)
    return finish(out, lse, req)


OPTIONS = {
    "block_q": f"queries sharing one choice of key blocks (default {DEFAULT_BLOCK_Q}; 1 = per query)",
    "block_k": f"keys per block (default {DEFAULT_BLOCK_K})",
    "budget": f"key blocks attended per query block (default {DEFAULT_BUDGET}); budget * block_k >= N_k is exact",
    "estimate": "'pooled' (default: block-mean key score map) or 'linear' (FAVOR+ linear-attention block mass)",
    "num_features": f"random features of the 'linear' estimate (default {DEFAULT_FEATURES})",
    "seed": SEED_DOC + " (used by estimate='linear')",
}

register(Method("sea", False, "estimated-mask sparse attention (after SEA, Lee et al. 2024): cheap block "
                "estimate, top-k key blocks per query block, exact attention on them; causal; KeyPadding",
                _supports, _run, OPTIONS))
