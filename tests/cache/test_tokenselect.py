"""TokenSelect: exact when k covers the candidates, soft-vote selection, reuse by query cosine, chunks."""
import importlib

import pytest
import torch

from anyattn.cache import TokenSelect, decode
from cache_helpers import filled, oracle, rand

decode_mod = importlib.import_module("anyattn.cache.decode")
ts_mod = importlib.import_module("anyattn.cache.tokenselect")


def test_published_defaults():
    p = TokenSelect()
    assert (p.n_init, p.n_local, p.k, p.reuse_threshold) == (128, 512, 2048, 0.9)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("T", [1, 3])
def test_k_covering_all_candidates_equals_exact(monkeypatch, shortcut, T):
    monkeypatch.setattr(decode_mod, "_EXACT_SHORTCUT", shortcut)
    lengths = [60, 23, 9]  # the last sequence is shorter than n_init + n_local: every token is init or local
    pol = TokenSelect(n_init=4, n_local=8, k=60)
    cache, k, v = filled(lengths, 2, 8, policy=pol)
    q = rand((3, 4, T, 8), seed=4)
    out, lse = decode(q, cache, return_lse=True)
    ref, ref_lse = oracle(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)
    assert cache.stats["selections"] == (0 if shortcut else 1)


def _vote_oracle(q, k, lengths, pol):
    """score_j = sum_h softmax_j(q_h . k_j) over each sequence's candidates, by loops."""
    H, H_kv = q.shape[1], k.shape[1]
    out = []
    for b, L in enumerate(lengths):
        lo, hi = pol.n_init, L - pol.n_local
        s = torch.zeros(hi - lo, dtype=torch.float64)
        for h in range(H):
            for t in range(q.shape[2]):
                s += torch.softmax(k[b, h // (H // H_kv), lo:hi] @ q[b, h, t], dim=0)
        out.append(s)
    return out


@pytest.mark.parametrize("two_pass", [False, True])
def test_vote_matches_loop_oracle(monkeypatch, two_pass):
    if two_pass:
        monkeypatch.setattr(ts_mod, "SCORE_ELEMENTS", 8)
        monkeypatch.setattr(ts_mod, "MIN_SCORE_CHUNK", 5)
    lengths = [40, 25]
    pol = TokenSelect(n_init=3, n_local=4, k=5)
    cache, k, v = filled(lengths, 2, 8, policy=pol)
    q = rand((2, 4, 2, 8), seed=6)
    n_cand = max(pol.candidates(lengths))
    scores = ts_mod.vote(decode_mod._fold(q, cache), lambda gi, lo, hi: cache.groups[gi].read_keys(lo, hi, cache),
                         cache.lengths, pol, n_cand)
    for b, want in enumerate(_vote_oracle(q, k, lengths, pol)):
        torch.testing.assert_close(scores[b, :len(want)], want, atol=1e-12, rtol=1e-12)
        assert torch.all(scores[b, len(want):] == -1)


def test_selected_set_is_init_topk_local():
    # Keys 20..24 align with the query: they must be selected; attention over the union matches the oracle
    # restricted to init U top-k U local.
    pol = TokenSelect(n_init=2, n_local=3, k=5, reuse_threshold=2.0)
    L, D = 50, 8
    k = rand((1, 1, L, D), seed=1) * 0.1
    u = torch.zeros(D, dtype=torch.float64)
    u[0] = 1
    k[0, 0, 20:25] += 3 * u
    v = rand((1, 1, L, D), seed=2)
    from anyattn.cache import KVCache
    cache = KVCache(1, 1, 4, D, dtype=torch.float64, policy=pol)
    cache.append(k, v)
    q = (4 * u).view(1, 1, 1, D)
    out = decode(q, cache)
    keep = [0, 1, 20, 21, 22, 23, 24, 47, 48, 49]
    ref, _ = oracle(q, k[:, :, keep], v[:, :, keep], [len(keep)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    assert sorted(cache.selection.idx[0].tolist()) == [20, 21, 22, 23, 24]


def test_reuse_while_cosine_high_and_no_duplicates_after_growth():
    pol = TokenSelect(n_init=2, n_local=4, k=6, reuse_threshold=0.9)
    cache, k, v = filled([40], 2, 8, policy=pol)
    q = rand((1, 4, 1, 8), seed=3)
    decode(q, cache)
    assert cache.stats == {"selections": 1, "reuses": 0}
    sel = cache.selection.idx.clone()
    # Grow so that selected tokens enter the local window: they must not be attended twice.
    kk, vv = [k], [v]
    for t in range(30):
        k1, v1 = rand((1, 2, 1, 8), seed=100 + t), rand((1, 2, 1, 8), seed=200 + t)
        cache.append(k1, v1)
        kk.append(k1)
        vv.append(v1)
    q2 = q + 0.01 * rand(q.shape, seed=9)
    out = decode(q2, cache)
    assert cache.stats == {"selections": 1, "reuses": 1}
    kf, vf = torch.cat(kk, 2), torch.cat(vv, 2)
    L = 70
    keep = sorted(set([0, 1] + sel[0].tolist() + list(range(L - 4, L))))
    ref, _ = oracle(q2, kf[:, :, keep], vf[:, :, keep], [len(keep)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    # An unrelated query reselects.
    decode(-q, cache)
    assert cache.stats == {"selections": 2, "reuses": 1}


def test_concentrated_attention_is_approximated_well():
    # A few needle keys aligned with the query carry almost all the attention mass.
    D, L = 16, 400
    k = rand((2, 2, L, D), seed=1)
    v = rand((2, 2, L, D), seed=2)
    u = torch.nn.functional.normalize(rand((D,), seed=3), dim=0)
    needles = [50, 123, 250, 300]
    k[:, :, needles] += 8 * u
    from anyattn.cache import KVCache
    cache = KVCache(2, 2, 8, D, dtype=torch.float64, policy=TokenSelect(n_init=8, n_local=16, k=16))
    cache.append(k, v)
    q = (6 * u).expand(2, 4, 1, D).contiguous()
    out = decode(q, cache)
    ref, _ = oracle(q, k, v, [L, L])
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cos.min() > 0.999


def test_bad_parameters():
    with pytest.raises(ValueError, match="n_local must be >= 1, got 0"):
        TokenSelect(n_local=0)
    with pytest.raises(TypeError, match="k must be an int, got float"):
        TokenSelect(k=2.0)
    with pytest.raises(ValueError, match="reuse_threshold must be a number >= -1"):
        TokenSelect(reuse_threshold=-3)


def test_prefill_chunk_selection_does_not_disturb_the_stored_selection():
    pol = TokenSelect(n_init=2, n_local=4, k=5)
    cache, k, v = filled([50, 44], 2, 8, policy=pol)
    q = rand((2, 4, 1, 8), seed=3)
    with torch.no_grad():
        first = decode(q, cache)
        decode(rand((2, 4, 3, 8), seed=4), cache)  # a chunk selects for itself
        again = decode(q, cache)  # reuses the stored selection
    assert cache.stats == {"selections": 2, "reuses": 1}
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    with torch.no_grad():
        decode(-q, cache)  # reselects in place (same shapes)
        decode(q, cache)
    torch.testing.assert_close(decode(q, cache), first, atol=1e-12, rtol=1e-12)
