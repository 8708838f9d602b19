"""`decode(q, cache)`: attention of new query tokens over a `KVCache`.

Exact path: for each sequence b of length L_b, query t of a chunk of T sits at position `L_b - T + t`
and attends to keys `j <= L_b - T + t` (`KeyPadding(lengths) & Causal()` bottom-right, per sequence).
Grouped-query attention folds the G query heads of a KV head into the query-length dim, so the keys
are read once per KV head (no repeat_interleave copy). Long caches may be split into chunks
attended separately and merged exactly by their LSE (`anyattn.lse.merge`, split-K / flash-decoding),
which pays off when `B * H_kv` is smaller than the number of parallel workers.

With `policy="tokenselect"` the step attends to the selected subset (see `tokenselect.py`); with
`compress="pca"` queries are projected into each KV head's basis and outputs back-projected (see
`pca.py`); with `quantize="int8"` stored keys/values are dequantized inside the step (see `int8.py`).

Precision: a bf16 / fp16 cache keeps its keys and values in that dtype; every path multiplies in the
matmul dtype of `anyattn.precision` (bf16 on CPU) and keeps softmax statistics, LSEs and accumulators in
fp32 (the exact path through `anyattn.attention`; TokenSelect's votes; the int8 path's online softmax);
PCA projections run in fp32. Outputs come back in the cache's dtype. Measured errors against float64
are in docs/decoding.md and bounded in tests/cache/test_decode_precision.py.
"""
from __future__ import annotations

import math

import torch

from ..api import attention
from ..lse import NEG_INF, finish, finite_or_zero, merge
from ..precision import matmul_dtype, stat_dtype
from ..validate import FLOAT_DTYPES, check_scale, check_tensor
from . import tokenselect as ts
from .kv_cache import KVCache

# When every sequence has at most k candidates, TokenSelect attends to everything: take the exact path.
_EXACT_SHORTCUT = True
# Split-K is considered only for caches at least this long (tokens per split at least SPLIT_MIN).
SPLIT_MIN = 4096
# int8 caches are converted to float in chunks of about this many bytes per operand (cache-resident; into a
# reused buffer) with an online softmax; INT8_CHUNK, when set, fixes the chunk length in tokens (tests).
INT8_CHUNK_BYTES = 1 << 21
INT8_CHUNK = None


def auto_splits(cache: KVCache, n_rows: int) -> int:
    """Number of key chunks for split-K: enough (B * H_kv * splits) work items for the device's parallel
    workers, each chunk at least `SPLIT_MIN` tokens; 1 for short caches or prefill chunks."""
    L = cache.max_length
    if n_rows > 64 or L < 2 * SPLIT_MIN:
        return 1
    workers = torch.get_num_threads() if cache.device.type == "cpu" else 128
    work = cache.B * cache.H_kv
    return max(1, min(math.ceil(workers / work), L // SPLIT_MIN))


def _mask(lengths: torch.Tensor, lo: int, hi: int, T: int, G: int, full: bool):
    """Bool `(B, 1, G*T, hi-lo)` for keys `[lo, hi)`: key j allowed for chunk query t of sequence b iff
    `j <= L_b - T + t`; None when everything is allowed (`full`: uniform lengths equal to hi, T == 1)."""
    if full:
        return None
    kv = torch.arange(lo, hi, device=lengths.device)
    lim = lengths[:, None] - T + torch.arange(T, device=lengths.device)[None, :]  # (B, T)
    m = kv[None, None, :] <= lim[:, :, None]
    return m[:, None].repeat(1, 1, G, 1)


def _check(q, cache, scale):
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an anyattn.cache.KVCache, got {type(cache).__name__}")
    check_tensor("q", q, 4)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q must have a floating dtype, got {q.dtype}")
    B, H, T, D = q.shape
    if B != cache.B:
        raise ValueError(f"q must have the cache's batch size {cache.B}, got {B} (q shape {tuple(q.shape)})")
    if H % cache.H_kv != 0:
        raise ValueError(f"q's heads ({H}) must be a multiple of the cache's KV heads (H_kv = {cache.H_kv})")
    if D != cache.D:
        raise ValueError(f"q must have the cache's head dim {cache.D}, got {D}")
    if T == 0:
        raise ValueError(f"q must hold at least one query token, got shape {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise ValueError(f"q must have the cache's dtype {cache.dtype}, got {q.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q must be on the cache's device {cache.device}, got {q.device}")
    if cache.max_length == 0:
        raise ValueError("the cache is empty: append the step's keys/values (cache.append) before decode")
    return check_scale(scale, D)


def _fold(q, cache):
    """Per KV-head group: queries `(B, h, G*T, d_k)` in the group's stored space."""
    B, H, T, D = q.shape
    G = H // cache.H_kv
    q5 = q.reshape(B, cache.H_kv, G * T, D)
    out = []
    for g in cache.groups:
        qg = q5 if g.all_heads else q5.index_select(1, g.heads_t)
        if g.proj is not None:
            qg = (qg.to(cache.proj_dtype) @ g.proj[0][None]).to(cache.dtype)
        out.append(qg)
    return out


def _exact(qf, gi, cache, T, G, scale, num_splits, scratch, need_lse):
    g = cache.groups[gi]
    L = cache.max_length
    if cache.quantize == "int8":
        return _int8_exact(qf, g, cache, T, G, scale, scratch)
    splits = num_splits if num_splits is not None else auto_splits(cache, qf.shape[2])
    splits = max(1, min(splits, L))
    full = T == 1 and cache.uniform
    if splits == 1 and not need_lse:  # one chunk, no LSE wanted: the plain (fastest) SDPA route
        k, v = g.read(0, L, cache, scratch)
        return attention(qf, k, v, mask=_mask(cache.lengths, 0, L, T, G, full), scale=scale), None
    bounds = [round(i * L / splits) for i in range(splits + 1)]
    outs, lses = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        k, v = g.read(lo, hi, cache, scratch)
        m = _mask(cache.lengths, lo, hi, T, G, full)
        o, s = attention(qf, k, v, mask=m, scale=scale, return_lse=True)
        outs.append(o)
        lses.append(s)
    return (outs[0], lses[0]) if len(outs) == 1 else merge(outs, lses)


def _int8_exact(qf, g, cache, T, G, scale, scratch):
    """Attention over an int8 cache, chunk by chunk (about `INT8_CHUNK_BYTES` per operand) with an online
    softmax. The per-token scales are applied to the scores and to the probabilities,
    `s_j = scale * ks_j * (q . k8_j)` and `o = sum_j p_j vs_j v8_j`, so each chunk is only converted
    int8 -> matmul dtype once (into a reused buffer). Matmul operands in `matmul_dtype` (bf16 for bf16 /
    fp16 caches on CPU), scores, statistics and the accumulator in fp32 (fp64 for fp64 caches)."""
    L = cache.max_length
    full = T == 1 and cache.uniform
    cdt = stat_dtype(cache.dtype)
    md = matmul_dtype(cache.dtype, qf.device)
    q = qf.to(md)
    B, h, R, _ = q.shape
    m_run = torch.full((B, h, R), NEG_INF, dtype=cdt, device=q.device)
    l_run = torch.zeros(B, h, R, dtype=cdt, device=q.device)
    acc = torch.zeros(B, h, R, g.d_v, dtype=cdt, device=q.device)
    chunk = INT8_CHUNK or max(256, INT8_CHUNK_BYTES // (B * h * max(g.d_k, g.d_v) * md.itemsize))
    for lo in range(0, L, chunk):
        hi = min(L, lo + chunk)
        kf = g.scratch("ik", (B, h, hi - lo, g.d_k), md, scratch)
        kf = g.k[:, :, lo:hi].to(md) if kf is None else kf.copy_(g.k[:, :, lo:hi])
        s = torch.matmul(kf, q.transpose(-1, -2)).transpose(-1, -2).to(cdt)  # (B, h, R, n)
        s = s * (scale * g.k_scale[:, :, None, lo:hi].to(cdt))
        m = _mask(cache.lengths, lo, hi, T, G, full)
        if m is not None:
            s = s.masked_fill(~m, NEG_INF)
        m_new = torch.maximum(m_run, s.amax(dim=-1))
        m_safe = finite_or_zero(m_new)
        alpha = torch.exp(m_run - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_run = l_run * alpha + p.sum(dim=-1)
        vf = g.scratch("iv", (B, h, hi - lo, g.d_v), md, scratch)
        vf = g.v[:, :, lo:hi].to(md) if vf is None else vf.copy_(g.v[:, :, lo:hi])
        acc = acc * alpha[..., None] + torch.matmul((p * g.v_scale[:, :, None, lo:hi].to(cdt)).to(md), vf)
        m_run = m_new
    out, lse = finish(m_run, l_run, acc)
    return out.to(cache.dtype), lse


def _tokenselect(pol, qfs, q, cache, T, G, scale, scratch):
    """TokenSelect step: attention over the kept set (init U top-k, excluding tokens now in the local window)
    and over the local window `[max(n_init, L_b - n_local), L_b)`, merged exactly by their LSE."""
    lens = cache.lengths_list()
    n_cand = max(pol.candidates(lens))
    if _EXACT_SHORTCUT and n_cand <= pol.k:
        return None
    sel = cache.selection
    if T == 1 and ts.reusable(sel, q, pol.reuse_threshold):
        cache.stats["reuses"] += 1
    else:
        scores = ts.vote(qfs, lambda gi, lo, hi: cache.groups[gi].read_keys(lo, hi, cache, scratch), cache.lengths,
                         pol, n_cand, ts.KEY_CHUNK if cache.quantize == "int8" else None)
        idx = ts.select(scores, pol)
        gidx, pos = ts.kept(idx, cache.lengths, pol)
        # Kept for reuse. In a one-token step without autograd the previous selection's buffers are overwritten
        # in place (no allocation); otherwise fresh tensors (a graph, or the stored selection, may hold the old).
        old = cache.selection if (scratch and T == 1 and cache.selection is not None
                                  and cache.selection.pos.shape == pos.shape) else None
        kv = [g.gather(gidx, cache, out=None if old is None else old.kv[gi]) for gi, g in enumerate(cache.groups)]
        sel = ts.Selection(q.reshape(q.shape[0], -1).detach().float(), idx, pos, kv)
        cache.stats["selections"] += 1
        if T == 1:
            cache.selection = sel
    L = cache.lengths
    lim = L[:, None] - T + torch.arange(T, device=q.device)[None, :]  # (B, T): last visible key per query
    start = ts.local_start(L, pol)  # (B,)
    m1 = (sel.pos < start[:, None])[:, None, :] & (sel.pos[:, None, :] <= lim[:, :, None])  # (B, T, S)
    m1 = None if bool(m1.all()) else m1[:, None].repeat(1, 1, G, 1)
    lo, hi = min(start.tolist()), cache.max_length
    j = torch.arange(lo, hi, device=q.device)
    m2 = (j[None, None, :] >= start[:, None, None]) & (j[None, None, :] <= lim[:, :, None])  # (B, T, n)
    m2 = None if bool(m2.all()) else m2[:, None].repeat(1, 1, G, 1)
    res = []
    for gi, qf in enumerate(qfs):
        k1, v1 = sel.kv[gi]
        o1, s1 = attention(qf, k1, v1, mask=m1, scale=scale, return_lse=True)
        if hi > lo:
            k2, v2 = cache.groups[gi].read(lo, hi, cache, scratch)
            o2, s2 = attention(qf, k2, v2, mask=m2, scale=scale, return_lse=True)
            o1, s1 = merge([o1, o2], [s1, s2])
        res.append((o1, s1))
    return res


def decode(q: torch.Tensor, cache: KVCache, *, scale=None, return_lse: bool = False, policy=None,
           num_splits: int | None = None):
    """Attention of new queries over a KV cache (one decoding step, or a prefill chunk).

    q: `(B, H, T, D)` in the cache's dtype and device, H a multiple of the cache's H_kv; T = 1 for a
        decoding step, T > 1 for a prefill chunk. The chunk's own keys/values must already be appended:
        query t of sequence b sits at position `lengths[b] - T + t` and sees keys `j <= lengths[b] - T + t`
        (bottom-right causal per sequence; a sequence shorter than its queries' positions gets 0 rows).
    cache: `anyattn.cache.KVCache`. Its options apply: `policy="tokenselect"` (approximate), `compress="pca"`
        (approximate below full rank), `quantize="int8"` (approximate).
    scale: multiplies `q k^T` (default `D ** -0.5` of the original head dim).
    policy: None (the cache's policy), "exact" to bypass token selection for this call, or a `TokenSelect`
        to select with it for this call (the selection state is kept in the cache either way).
    num_splits: split-K chunks for the exact path (None: `auto_splits`).
    Returns out `(B, H, T, D_v)` (the cache's dtype), or `(out, lse)` with lse `(B, H, T)` float32/64.
    Differentiable in q.
    """
    if not isinstance(cache, KVCache) and callable(getattr(cache, "decode", None)):
        return cache.decode(q, scale=scale, return_lse=return_lse)   # a remote cache (anyattn.distributed.offload)
    scale = _check(q, cache, scale)
    if not (policy is None or policy == "exact" or isinstance(policy, ts.TokenSelect)):
        raise ValueError(f"policy must be None (the cache's), 'exact' or a TokenSelect, got {policy!r}")
    if num_splits is not None:
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")
    B, H, T, D = q.shape
    G = H // cache.H_kv
    qfs = _fold(q, cache)
    # Reused work buffers are safe only when no graph keeps the gathered / dequantized keys for backward.
    scratch = not (torch.is_grad_enabled() and q.requires_grad)
    res = None
    pol = cache.policy if policy is None else (None if policy == "exact" else policy)
    if pol is not None:
        res = _tokenselect(pol, qfs, q, cache, T, G, scale, scratch)
    if res is None:
        res = [_exact(qf, gi, cache, T, G, scale, num_splits, scratch, return_lse) for gi, qf in enumerate(qfs)]
    if len(cache.groups) == 1 and cache.groups[0].all_heads and cache.projection is None:
        out, lse = res[0]
    else:
        out = q.new_zeros(B, cache.H_kv, G * T, cache.D_v, dtype=cache.proj_dtype)
        lse = None
        if cache.projection is not None:
            # Rows with no visible key (query position < 0) stay 0 rather than mu_V.
            qpos = cache.lengths[:, None] - T + torch.arange(T, device=q.device)[None, :]  # (B, T)
            empty = (qpos < 0)[:, None, None, :].expand(B, 1, G, T).reshape(B, 1, G * T, 1)
        for (o, s), g in zip(res, cache.groups):
            if g.proj is not None:
                _, _, Uv, mv = g.proj
                o = o.to(cache.proj_dtype) @ Uv.transpose(1, 2)[None] + mv[None, :, None]
                o = o.masked_fill(empty, 0.0)
            if s is not None and lse is None:
                lse = torch.zeros(B, cache.H_kv, G * T, dtype=s.dtype, device=q.device)
            if g.all_heads:
                out, lse = o, s
            else:
                out = out.index_copy(1, g.heads_t, o.to(out.dtype))
                if s is not None:
                    lse = lse.index_copy(1, g.heads_t, s)
        if cache.projection is not None and lse is not None:
            # Centered keys shift every score of a row by scale * q . mu_K: add it back to the LSE.
            shift = (q.reshape(B, cache.H_kv, G * T, D).to(cache.proj_dtype) * cache._mu_k[None, :, None]).sum(-1)
            lse = lse + (scale * shift).to(lse.dtype)
        out = out.to(cache.dtype)
    out = out.reshape(B, H, T, cache.D_v)
    if not return_lse:
        return out
    return out, lse.reshape(B, H, T)
