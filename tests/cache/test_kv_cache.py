"""KVCache bookkeeping: append (uniform, ragged, growth), truncate, reorder (beam search), accounting, errors."""
import pytest
import torch

from anyattn.cache import KVCache, TokenSelect, decode, fit_pca
from cache_helpers import filled, oracle, rand


def test_append_ragged_then_steps_matches_oracle():
    cache = KVCache(2, 2, 4, 8, dtype=torch.float64)  # capacity 4: grows
    k0, v0 = rand((2, 2, 6, 8)), rand((2, 2, 6, 8), seed=1)
    cache.append(k0, v0, n_new=torch.tensor([6, 2]))
    assert cache.lengths.tolist() == [6, 2] and cache.capacity >= 6
    ks = [k0[0, :, :6], k0[1, :, :2]]
    vs = [v0[0, :, :6], v0[1, :, :2]]
    for t in range(3):
        k1, v1 = rand((2, 2, 1, 8), seed=10 + t), rand((2, 2, 1, 8), seed=20 + t)
        cache.append(k1, v1)
        ks = [torch.cat([ks[b], k1[b]], 1) for b in range(2)]
        vs = [torch.cat([vs[b], v1[b]], 1) for b in range(2)]
    assert cache.lengths_list() == [9, 5]
    q = rand((2, 4, 1, 8), seed=3)
    L = 9
    kf = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[1])) for x in ks])
    vf = torch.stack([torch.nn.functional.pad(x, (0, 0, 0, L - x.shape[1])) for x in vs])
    ref, _ = oracle(q, kf, vf, [9, 5])
    torch.testing.assert_close(decode(q, cache), ref, atol=1e-12, rtol=1e-12)
    k_rec, v_rec = cache.reconstruct()
    torch.testing.assert_close(k_rec[1, :, :5], ks[1])


def test_grow_false_raises_when_full():
    cache = KVCache(1, 1, 3, 4, grow=False)
    cache.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="KVCache is full: appending needs 4 positions but max_len = 3"):
        cache.append(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_truncate_rolls_back():
    lengths = [10, 8]
    cache, k, v = filled(lengths, 1, 4)
    cache.truncate([6, 8])
    q = rand((2, 1, 1, 4), seed=2)
    ref, _ = oracle(q, k, v, [6, 8])
    torch.testing.assert_close(decode(q, cache), ref)
    cache.truncate(3)
    assert cache.lengths_list() == [3, 3]
    with pytest.raises(ValueError, match=r"truncate can only shorten: lengths\[1\] must lie in \[0, 3\], got 5"):
        cache.truncate([3, 5])
    with pytest.raises(ValueError, match="lengths must hold B = 2 values, got 3"):
        cache.truncate([1, 1, 1])
    with pytest.raises(TypeError, match="lengths must be an int"):
        cache.truncate(1.5)


@pytest.mark.parametrize("opts", [{}, {"quantize": "int8"}, {"policy": TokenSelect(n_init=2, n_local=2, k=3)}])
def test_reorder_for_beam_search(opts):
    lengths = [10, 7, 9]
    cache, k, v = filled(lengths, 2, 4, **opts)
    q = rand((3, 2, 1, 4), seed=5)
    before = decode(q, cache)  # (makes a selection under tokenselect)
    idx = torch.tensor([2, 2, 0, 1])
    cache.reorder(idx)
    assert cache.B == 4 and cache.lengths_list() == [9, 9, 10, 7]
    after = decode(q[idx], cache)
    torch.testing.assert_close(after, before[idx], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match=r"index must hold at least one value in \[0, B = 4\), got \[4\]"):
        cache.reorder([4])
    with pytest.raises(TypeError, match="index must be an integer tensor"):
        cache.reorder(torch.tensor([0.0]))


def test_reset_and_repr():
    cache, _, _ = filled([3, 4], 1, 4)
    cache.reset()
    assert cache.lengths_list() == [0, 0] and cache.max_length == 0
    assert "KVCache(B=2" in repr(cache)


def test_byte_accounting():
    D, H_kv = 64, 2
    exact = KVCache(1, H_kv, 100, D)
    assert exact.bytes_per_token() == 2 * H_kv * D * 4 and exact.nbytes() == 100 * exact.bytes_per_token()
    q8 = KVCache(1, H_kv, 100, D, quantize="int8")
    assert q8.bytes_per_token() == 2 * H_kv * (D + 4)  # int8 values + one float32 scale per token and head
    proj = fit_pca(rand((1, H_kv, 50, D)), rand((1, H_kv, 50, D), seed=1)).with_ranks(D // 2)
    pc = KVCache(1, H_kv, 100, D, compress="pca", projection=proj)
    assert pc.bytes_per_token() * 2 == exact.bytes_per_token()
    exact.append(torch.zeros(1, H_kv, 7, D), torch.zeros(1, H_kv, 7, D))
    assert exact.stored_bytes() == 7 * exact.bytes_per_token()


def test_constructor_and_append_errors_name_the_argument():
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        KVCache(0, 1, 4, 4)
    with pytest.raises(TypeError, match="head_dim must be an int"):
        KVCache(1, 1, 4, 4.0)
    with pytest.raises(TypeError, match="dtype must be one of"):
        KVCache(1, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="policy must be None, 'exact', 'tokenselect' or a TokenSelect, got 'lru'"):
        KVCache(1, 1, 4, 4, policy="lru")
    with pytest.raises(ValueError, match="compress must be None or 'pca', got 'svd'"):
        KVCache(1, 1, 4, 4, compress="svd")
    with pytest.raises(ValueError, match="compress='pca' needs projection=PCAProjection"):
        KVCache(1, 1, 4, 4, compress="pca")
    with pytest.raises(ValueError, match="quantize must be None or 'int8', got 'int4'"):
        KVCache(1, 1, 4, 4, quantize="int4")
    proj = fit_pca(rand((1, 2, 9, 4)), rand((1, 2, 9, 4), seed=1))
    with pytest.raises(ValueError,
                       match=r"projection must be fitted for \(H_kv, D, D_v\) = \(1, 4, 4\), got \(2, 4, 4\)"):
        KVCache(1, 1, 4, 4, compress="pca", projection=proj)
    cache = KVCache(2, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"k must have shape \(B=2, H_kv=2, T, D=4\), got \(2, 1, 3, 4\)"):
        cache.append(rand((2, 1, 3, 4)), rand((2, 1, 3, 4)))
    with pytest.raises(ValueError, match=r"v must have shape \(B=2, H_kv=2, T=3, D_v=4\), got \(2, 2, 2, 4\)"):
        cache.append(rand((2, 2, 3, 4)), rand((2, 2, 2, 4)))
    with pytest.raises(ValueError, match="k must have the cache's dtype torch.float64, got torch.float32"):
        cache.append(rand((2, 2, 3, 4), torch.float32), rand((2, 2, 3, 4), torch.float32))
    with pytest.raises(ValueError, match=r"n_new must hold B = 2 counts in \[0, T = 3\], got \[4, 1\]"):
        cache.append(rand((2, 2, 3, 4)), rand((2, 2, 3, 4)), n_new=[4, 1])
