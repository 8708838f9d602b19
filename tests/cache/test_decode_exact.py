"""Exact decode over a KVCache equals full attention on each sequence's prefix (outputs, LSE, q-gradients)."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.cache import KVCache, auto_splits, decode
from cache_helpers import filled, oracle, rand

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
decode_mod = importlib.import_module("anyattn.cache.decode")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,H_kv", [(4, 4), (4, 2), (6, 1)])
def test_one_token_step_equals_prefix_attention(dtype, H, H_kv):
    lengths = [37, 5, 20]
    cache, k, v = filled(lengths, H_kv, 16, dtype=dtype)
    q = rand((3, H, 1, 16), dtype, seed=7)
    out, lse = decode(q, cache, return_lse=True)
    ref, ref_lse = oracle(q, k, v, lengths)
    assert out.dtype == dtype and out.shape == (3, H, 1, 16)
    torch.testing.assert_close(out.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("T", [2, 7])
def test_prefill_chunk_is_bottom_right_causal_per_sequence(T):
    lengths = [12, 7, 3]  # the last sequence is shorter than the chunk when T = 7: its first rows are empty
    cache, k, v = filled(lengths, 2, 8, D_v=5)
    q = rand((3, 4, T, 8), seed=3)
    out, lse = decode(q, cache, return_lse=True)
    ref, ref_lse = oracle(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("splits", [1, 2, 5, 64])
def test_split_k_merge_is_exact(splits):
    lengths = [40, 33]
    cache, k, v = filled(lengths, 2, 8)
    q = rand((2, 4, 1, 8), seed=4)
    out, lse = decode(q, cache, return_lse=True, num_splits=splits, scale=0.3)
    ref, ref_lse = oracle(q, k, v, lengths, scale=0.3)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)


def test_auto_splits_rules(monkeypatch):
    cache, _, _ = filled([16], 1, 4)
    assert auto_splits(cache, 1) == 1  # short cache: no split
    monkeypatch.setattr(decode_mod, "SPLIT_MIN", 4)
    n = auto_splits(cache, 1)
    assert 1 <= n <= 4 and n == min(max(1, torch.get_num_threads()), 4)
    assert auto_splits(cache, 1000) == 1  # many query rows: no split


def test_gradient_wrt_q_matches_reference():
    lengths = [9, 4]
    cache, k, v = filled(lengths, 1, 6)
    q = rand((2, 2, 3, 6), seed=5).requires_grad_()
    out, lse = decode(q, cache, return_lse=True)
    w = rand(out.shape, seed=9)
    finite = torch.isfinite(lse)
    g1, = torch.autograd.grad((out * w).sum() + torch.where(finite, lse, 0).sum(), q)
    q2 = q.detach().clone().requires_grad_()
    ref, ref_lse = oracle(q2, k, v, lengths)
    g2, = torch.autograd.grad((ref * w).sum() + torch.where(finite, ref_lse, 0).sum(), q2)
    torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-10)


def test_zero_length_sequence_gives_zero_and_neg_inf():
    cache = KVCache(2, 1, 4, 4, dtype=torch.float64)
    cache.append(rand((2, 1, 3, 4)), rand((2, 1, 3, 4), seed=1), n_new=[3, 0])
    out, lse = decode(rand((2, 2, 1, 4), seed=2), cache, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert torch.isfinite(out).all()


@settings(deadline=None, max_examples=12)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), G=st.sampled_from([1, 2, 3]),
       H_kv=st.sampled_from([1, 2]), T=st.integers(1, 4), D=st.sampled_from([3, 8]), D_v=st.sampled_from([2, 8]),
       splits=st.sampled_from([None, 1, 3]), seed=st.integers(0, 50))
def test_property_decode_matches_oracle(lengths, G, H_kv, T, D, D_v, splits, seed):
    cache, k, v = filled(lengths, H_kv, D, D_v, seed=seed)
    q = rand((len(lengths), G * H_kv, T, D), seed=seed + 11)
    if seed % 2:  # non-contiguous query
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = decode(q, cache, return_lse=True, num_splits=splits)
    ref, ref_lse = oracle(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_decode_bad_inputs_name_the_argument():
    cache, _, _ = filled([5, 5], 2, 8)
    with pytest.raises(TypeError, match="cache must be an anyattn.cache.KVCache"):
        decode(rand((2, 2, 1, 8)), object())
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        decode(rand((2, 1, 8)), cache)
    with pytest.raises(ValueError, match="batch size 2, got 3"):
        decode(rand((3, 2, 1, 8)), cache)
    with pytest.raises(ValueError, match=r"multiple of the cache's KV heads \(H_kv = 2\)"):
        decode(rand((2, 3, 1, 8)), cache)
    with pytest.raises(ValueError, match="head dim 8, got 4"):
        decode(rand((2, 2, 1, 4)), cache)
    with pytest.raises(ValueError, match="dtype torch.float64, got torch.float32"):
        decode(rand((2, 2, 1, 8), torch.float32), cache)
    with pytest.raises(ValueError, match="num_splits must be None or an int >= 1, got 0"):
        decode(rand((2, 2, 1, 8)), cache, num_splits=0)
    with pytest.raises(ValueError, match="policy must be None"):
        decode(rand((2, 2, 1, 8)), cache, policy="fast")
    with pytest.raises(ValueError, match="the cache is empty"):
        decode(rand((2, 2, 1, 8)), KVCache(2, 2, 4, 8, dtype=torch.float64))
