"""Shared helpers for the KV-cache tests: filled caches and the per-sequence float64 oracle."""
from __future__ import annotations

import torch

import anyattn
from anyattn.cache import KVCache
from anyattn.masks import Causal


def rand(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def filled(lengths, H_kv, D, D_v=None, dtype=torch.float64, seed=0, max_len=8, **opts):
    """A cache holding random keys/values with the given per-sequence lengths; returns (cache, k, v) with the
    full k `(B, H_kv, max(lengths), D)`, v."""
    D_v = D if D_v is None else D_v
    B, L = len(lengths), max(lengths)
    k = rand((B, H_kv, L, D), dtype, seed)
    v = rand((B, H_kv, L, D_v), dtype, seed + 1)
    cache = KVCache(B, H_kv, max_len, D, D_v, dtype=dtype, **opts)
    cache.append(k, v, n_new=list(lengths))
    return cache, k, v


def oracle(q, k, v, lengths, scale=None):
    """Per sequence: float64 reference attention of q `(B, H, T, D)` over its prefix with bottom-right causal."""
    outs, lses = [], []
    for b, L in enumerate(lengths):
        o, s = anyattn.attention(q[b:b + 1].double(), k[b:b + 1, :, :L].double(), v[b:b + 1, :, :L].double(),
                                 mask=Causal(), scale=scale, method="reference", return_lse=True)
        outs.append(o)
        lses.append(s)
    return torch.cat(outs), torch.cat(lses)
