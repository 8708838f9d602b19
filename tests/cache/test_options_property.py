"""Property: the approximate options are exact at their exact settings (TokenSelect with k >= candidates,
PCA at full rank), alone and together, over random shapes, ragged lengths, GQA and chunks."""
import importlib

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.cache import KVCache, TokenSelect, decode, fit_pca
from cache_helpers import oracle, rand

decode_mod = importlib.import_module("anyattn.cache.decode")


@settings(deadline=None, max_examples=10)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=3), G=st.sampled_from([1, 2]),
       H_kv=st.sampled_from([1, 2]), T=st.integers(1, 3), D=st.sampled_from([4, 8]),
       use_ts=st.booleans(), use_pca=st.booleans(), seed=st.integers(0, 30))
def test_exact_settings_are_exact(lengths, G, H_kv, T, D, use_ts, use_pca, seed):
    B, L = len(lengths), max(lengths)
    k, v = rand((B, H_kv, L, D), seed=seed) + 1.0, rand((B, H_kv, L, D), seed=seed + 1)
    opts = {}
    if use_ts:
        opts["policy"] = TokenSelect(n_init=2, n_local=3, k=L)
    if use_pca:
        opts["compress"] = fit_pca(rand((1, H_kv, 16, D), seed=seed + 5), rand((1, H_kv, 16, D), seed=seed + 6))
    cache = KVCache(B, H_kv, 4, D, dtype=torch.float64, **opts)
    cache.append(k, v, n_new=lengths)
    q = rand((B, G * H_kv, T, D), seed=seed + 2)
    old = decode_mod._EXACT_SHORTCUT
    decode_mod._EXACT_SHORTCUT = False  # exercise the selection machinery even when k covers everything
    try:
        out, lse = decode(q, cache, return_lse=True)
    finally:
        decode_mod._EXACT_SHORTCUT = old
    ref, ref_lse = oracle(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
