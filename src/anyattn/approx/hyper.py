"""`hyper`: HyperAttention (Han et al., 2024, "HyperAttention: Long-context Attention in Near-Linear
Time", ICLR), following METHODS.md "HyperAttention" and the authors' public code.

Non-causal, per head:
1. sortLSH: shared Gaussian directions `W (D, r)` (r = `lsh_num_projs`); a row's bucket is its sign
   bits `x W > 0` read as an r-bit Gray code, ranked by position in the Gray sequence, so adjacent
   buckets differ in one hyperplane. Queries and keys are stably sorted by bucket.
2. Block-diagonal exact part: the sorted sequences are cut into `nb = ceil(N_k / block_size)` aligned
   blocks (query block `ceil(N_q / nb)`), and exact attention runs inside each block — as one fused
   call on `(B*H, nb, block, D)` through `sdpa` (CPU, differentiable LSE) or `blocked`.
3. Residual: `sample_size` keys drawn uniformly (with replacement, shared by the queries of a head)
   from the sorted keys; a query ignores samples from its own block; the sampled part's LSE gets
   `+ log(N_k / sample_size)` (importance weight).
4. Both parts merge exactly by LSE (`anyattn.lse.merge`), then outputs are unsorted.
When one block covers all keys the result is exact attention.

Causal (N_q == N_k): below `min_seq_len` exact causal attention; else recurse on the two diagonal
halves and merge the off-diagonal (second-half queries x first-half keys, non-causal) part by LSE.
Biases and other masks are refused. Returns an approximate LSE.

Shapes: q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` -> `(B, H, N_q, D_v)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..lse import merge
from ..masks import Causal, Dense
from ..registry import Method, Request, register
from ..softmax.lse_attention import attention_lse
from ._common import SEED_DOC, expand_kv, finish, generator, pad_to, positive_int, screen

DEFAULT_BLOCK = 256
DEFAULT_SAMPLES = 256
DEFAULT_PROJS = 7
DEFAULT_MIN_SEQ_LEN = 4096


def gray_rank(r: int, device=None) -> torch.Tensor:
    """`rank[code]` = position of the r-bit `code` in the reflected Gray sequence (`gray(n) = n ^ (n >> 1)`)."""
    n = torch.arange(1 << r, device=device)
    gray = n ^ (n >> 1)
    rank = torch.empty_like(n)
    rank[gray] = n
    return rank.to(device)


def lsh_buckets(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Bucket ranks `(..., N)` of rows `x (..., N, D)` under directions `w (D, r)`."""
    r = w.shape[1]
    bits = (x @ w.to(x.dtype) > 0).long()
    code = (bits * (1 << torch.arange(r, device=x.device))).sum(-1)
    return gray_rank(r, x.device)[code]


@dataclass
class Plan:
    """The random choices of one non-causal HyperAttention call (for tests and dense formulations):
    q_order, k_order `(B, H, N)` sort permutations; samples `(B, H, m)` indices into sorted keys;
    block_q, block_k: block sizes in sorted order; weight: `N_k / m`."""

    q_order: torch.Tensor
    k_order: torch.Tensor
    samples: torch.Tensor
    block_q: int
    block_k: int
    nb: int
    weight: float


def make_plan(q, k, block_size: int, sample_size: int, lsh_num_projs: int, gen: torch.Generator) -> Plan:
    B, H, N_q, D = q.shape
    N_k = k.shape[2]
    w = torch.randn(D, lsh_num_projs, generator=gen,
                    dtype=torch.float64).to(q.device)  # host: seeded CPU generator (same draws everywhere)
    with torch.no_grad():
        q_order = torch.argsort(lsh_buckets(q, w), dim=-1, stable=True)
        k_order = torch.argsort(lsh_buckets(k, w), dim=-1, stable=True)
    nb = -(-N_k // block_size)
    block_k = -(-N_k // nb)
    block_q = -(-N_q // nb)
    samples = torch.randint(N_k, (B, H, sample_size), generator=gen).to(q.device)  # host: seeded CPU generator
    return Plan(q_order, k_order, samples, block_q, block_k, nb, N_k / sample_size)


def _gather(x, idx):
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def noncausal(q, k, v, scale: float, plan: Plan):
    """One non-causal HyperAttention pass with a given plan. Returns `(out, lse)`."""
    B, H, N_q, D = q.shape
    N_k, D_v = k.shape[2], v.shape[-1]
    nb, bq, bk = plan.nb, plan.block_q, plan.block_k
    qs, ks, vs = _gather(q, plan.q_order), _gather(k, plan.k_order), _gather(v, plan.k_order)
    # 1. block-diagonal part, one fused call over (B*H, nb) blocks
    qb = pad_to(qs, nb * bq, 2).reshape(B * H, nb, bq, D)
    kb = pad_to(ks, nb * bk, 2).reshape(B * H, nb, bk, D)
    vb = pad_to(vs, nb * bk, 2).reshape(B * H, nb, bk, D_v)
    mask = None
    if nb * bk != N_k:
        valid = torch.arange(nb * bk, device=q.device) < N_k
        mask = Dense(valid.view(1, nb, 1, bk))
    o1, l1 = attention_lse(qb, kb, vb, mask=mask, scale=scale)
    o1 = o1.reshape(B, H, nb * bq, D_v)[:, :, :N_q]
    l1 = l1.reshape(B, H, nb * bq)[:, :, :N_q]
    if nb == 1:
        out_s, lse_s = o1, l1
    else:
        # 2. sampled residual: keys outside the query's own block, weighted by N_k / m
        ksub, vsub = _gather(ks, plan.samples), _gather(vs, plan.samples)
        q_block = torch.arange(N_q, device=q.device) // bq
        s_block = plan.samples // bk  # (B, H, m)
        allowed = q_block.view(1, 1, N_q, 1) != s_block.unsqueeze(2)
        o2, l2 = attention_lse(qs, ksub, vsub, mask=Dense(allowed), scale=scale)
        out_s, lse_s = merge([o1, o2], [l1, l2 + math.log(plan.weight)])
    # 3. unsort
    inv = torch.argsort(plan.q_order, dim=-1)
    out = _gather(out_s, inv)
    lse = torch.gather(lse_s, 2, inv)
    return out, lse


def _causal(q, k, v, scale, opts, gen):
    N = q.shape[2]
    if N <= opts["min_seq_len"]:
        return attention_lse(q, k, v, mask=Causal(), scale=scale)
    h = N // 2
    o1, l1 = _causal(q[:, :, :h], k[:, :, :h], v[:, :, :h], scale, opts, gen)
    o2, l2 = _causal(q[:, :, h:], k[:, :, h:], v[:, :, h:], scale, opts, gen)
    plan = make_plan(q[:, :, h:], k[:, :, :h], opts["block_size"], opts["sample_size"], opts["lsh_num_projs"], gen)
    o3, l3 = noncausal(q[:, :, h:], k[:, :, :h], v[:, :, :h], scale, plan)
    o2, l2 = merge([o2, o3], [l2, l3])
    return torch.cat([o1, o2], 2), torch.cat([l1, l2], 2)


def hyper_attention(q, k, v, scale: float, *, causal: bool = False, block_size: int = DEFAULT_BLOCK,
                    sample_size: int = DEFAULT_SAMPLES, lsh_num_projs: int = DEFAULT_PROJS,
                    min_seq_len: int = DEFAULT_MIN_SEQ_LEN, seed=0):
    """HyperAttention on expanded heads (q, k, v with the same H). Returns `(out, lse)`."""
    gen = generator(seed)
    if causal:
        opts = dict(block_size=block_size, sample_size=sample_size, lsh_num_projs=lsh_num_projs,
                    min_seq_len=min_seq_len)
        return _causal(q, k, v, scale, opts, gen)
    plan = make_plan(q, k, block_size, sample_size, lsh_num_projs, gen)
    return noncausal(q, k, v, scale, plan)


def _supports(req: Request):
    return screen(req, "hyper", causal=True, causal_square=True)


def _run(req: Request, block_size: int = DEFAULT_BLOCK, sample_size: int = DEFAULT_SAMPLES,
         lsh_num_projs: int = DEFAULT_PROJS, min_seq_len: int = DEFAULT_MIN_SEQ_LEN, seed=0):
    positive_int("block_size", block_size)
    positive_int("sample_size", sample_size)
    positive_int("lsh_num_projs", lsh_num_projs)
    if lsh_num_projs > 20:
        raise ValueError(f"lsh_num_projs must be <= 20 (2**r Gray-code table), got {lsh_num_projs}")
    positive_int("min_seq_len", min_seq_len)
    q, k, v = expand_kv(req)
    out, lse = hyper_attention(q, k, v, req.scale, causal=isinstance(req.mask, Causal), block_size=block_size,
                               sample_size=sample_size, lsh_num_projs=lsh_num_projs, min_seq_len=min_seq_len,
                               seed=seed)
    return finish(out, lse, req)


OPTIONS = {
    "block_size": f"key block of the exact block-diagonal part in sorted order (default {DEFAULT_BLOCK}); "
                  ">= N_k gives exact attention",
    "sample_size": f"uniformly sampled residual keys per head (default {DEFAULT_SAMPLES})",
    "lsh_num_projs": f"sortLSH hyperplanes r, 2**r Gray-code buckets (default {DEFAULT_PROJS})",
    "min_seq_len": f"causal: below this length run exact causal attention (default {DEFAULT_MIN_SEQ_LEN})",
    "seed": SEED_DOC,
}

register(Method("hyper", False, "HyperAttention (Han et al. 2024): sortLSH block-diagonal exact part + uniform "
                "residual samples, LSE merge; causal by recursive halves; approximate LSE",
                _supports, _run, OPTIONS))
