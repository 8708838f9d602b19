"""Projection compression (PCA bases, greedy ranks, Cayley fine-tuning) and int8 storage."""
import pytest
import torch

from anyattn.cache import (KVCache, PCACalibrator, TokenSelect, compressed_attention, decode, finetune, fit_pca,
                           greedy_ranks, int8_dequantize, int8_quantize)
from anyattn.cache.pca import _cayley
from cache_helpers import filled, oracle, rand


def _lowrank_kv(B, H_kv, N, D, r, seed=0):
    """Keys/values that live (up to tiny noise) in an r-dim subspace plus a mean."""
    basis = torch.linalg.qr(rand((H_kv, D, D), seed=seed))[0][:, :, :r]
    z = rand((B, H_kv, N, r), seed=seed + 1) * 3
    mu = rand((H_kv, D), seed=seed + 2)
    noise = 1e-3 * rand((B, H_kv, N, D), seed=seed + 3)
    return z @ basis.transpose(1, 2)[None] + mu[None, :, None] + noise


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_pca_equals_exact(dtype):
    lengths = [30, 17]
    k = rand((2, 2, 30, 8), dtype) + 2.0  # a non-zero mean exercises the centering and the LSE correction
    v = rand((2, 2, 30, 6), dtype, seed=1) - 1.0
    proj = fit_pca(k, v)
    cache = KVCache(2, 2, 8, 8, 6, dtype=dtype, compress="pca", projection=proj)
    cache.append(k, v, n_new=lengths)
    q = rand((2, 4, 2, 8), dtype, seed=2)
    out, lse = decode(q, cache, return_lse=True)
    ref, ref_lse = oracle(q, k, v, lengths)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def test_mixed_ranks_decode_equals_compressed_attention_and_gradient():
    lengths = [25, 12]
    k, v = rand((2, 3, 25, 8)), rand((2, 3, 25, 8), seed=1)
    proj = fit_pca(k, v).with_ranks([2, 8, 2], [4, 4, 8])
    assert len(proj.groups()) == 3
    cache = KVCache(2, 3, 8, 8, dtype=torch.float64, compress=proj)
    cache.append(k, v, n_new=lengths)
    assert cache.bytes_per_token() == 8 * (12 + 16)
    q = rand((2, 6, 1, 8), seed=2)
    out = decode(q, cache)
    for b, L in enumerate(lengths):
        want = compressed_attention(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], proj)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-12, rtol=1e-12)
    # gradient of the compressed function (used by finetune) against finite differences
    qg = q[:1, :, :, :].clone().requires_grad_()
    f = lambda qq: compressed_attention(qq, k[:1], v[:1], proj).sum()  # noqa: E731
    assert torch.autograd.gradcheck(f, (qg,), fast_mode=True)


def test_low_rank_data_is_compressed_almost_losslessly():
    k = _lowrank_kv(1, 2, 200, 16, 4)
    v = _lowrank_kv(1, 2, 200, 16, 4, seed=10)
    proj = fit_pca(k, v).with_ranks(4)
    ek, ev = proj.explained_variance()
    assert ek.min() > 0.9999 and ev.min() > 0.9999
    cache = KVCache(1, 2, 256, 16, dtype=torch.float64, compress="pca", projection=proj)
    cache.append(k, v)
    q = rand((1, 4, 1, 16), seed=5)
    err = (decode(q, cache) - oracle(q, k, v, [200])[0]).abs().max()
    assert err < 1e-2


def test_calibrator_streams_to_the_same_bases():
    k, v = rand((3, 2, 20, 5)), rand((3, 2, 20, 4), seed=1)
    cal = PCACalibrator(2, 5, 4)
    for b in range(3):
        cal.update(k[b:b + 1], v[b:b + 1])
    a, b = cal.finish(), fit_pca(k, v)
    torch.testing.assert_close(a.var_k, b.var_k)
    torch.testing.assert_close(a.mu_v, b.mu_v)
    eye = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    torch.testing.assert_close(a.basis_k.transpose(1, 2) @ a.basis_k, eye)
    assert torch.all(a.var_k[:, :-1] >= a.var_k[:, 1:])  # descending


def test_greedy_ranks_follow_the_variance_and_the_budget():
    # head 0 keys are rank 4, head 1 keys full rank; values full rank everywhere
    k0 = _lowrank_kv(1, 1, 300, 32, 4)
    k1 = rand((1, 1, 300, 32), seed=3)
    k = torch.cat([k0, k1], 1)
    v = rand((1, 2, 300, 32), seed=4)
    proj = fit_pca(k, v)
    rk, rv = greedy_ranks(proj, 0.5, multiple_of=4)
    assert sum(rk) + sum(rv) <= 0.5 * 2 * 64
    assert rk[0] == 4 and rk[1] > rk[0]  # the low-rank head gets no more than it needs
    p2 = proj.with_budget(0.5, multiple_of=4)
    assert (p2.ranks_k, p2.ranks_v) == (rk, rv) and abs(p2.compression() - 0.5) < 0.07
    with pytest.raises(ValueError, match=r"budget must be a fraction in \(0, 1\]"):
        greedy_ranks(proj, 1.5)
    with pytest.raises(ValueError, match="but the minimum"):
        greedy_ranks(proj, 0.01, multiple_of=8)
    with pytest.raises(ValueError, match=r"rank_k must lie in \[1, 32\]"):
        proj.with_ranks(33)
    with pytest.raises(ValueError, match="rank_v must be an int or a sequence of H_kv = 2 ints"):
        proj.with_ranks(4, [1, 2, 3])


def test_cayley_finetuning_lowers_the_distillation_loss():
    torch.manual_seed(0)
    q = rand((1, 4, 32, 8), torch.float32, seed=1)
    k = rand((1, 2, 32, 8), torch.float32, seed=2)
    v = rand((1, 2, 32, 8), torch.float32, seed=3)
    proj = fit_pca(k, v).with_ranks(3)
    new, losses = finetune(proj, q, k, v, steps=10, lr=0.1)
    assert losses[-1] < 0.8 * losses[0]
    U = new.basis_k
    torch.testing.assert_close(U.transpose(1, 2) @ U, torch.eye(8, dtype=U.dtype).expand_as(U), atol=1e-5, rtol=0)
    w = rand((2, 5, 5), seed=4)
    C = _cayley(w)
    torch.testing.assert_close(C.transpose(1, 2) @ C, torch.eye(5, dtype=C.dtype).expand(2, 5, 5))


def test_int8_roundtrip_error_bound():
    x = rand((3, 4, 50, 16)) * torch.logspace(-3, 3, 50, dtype=torch.float64)[None, None, :, None]
    x[0, 0, 0] = 0
    qx, s = int8_quantize(x)
    assert qx.dtype == torch.int8 and s.shape == x.shape[:-1]
    err = (int8_dequantize(qx, s, torch.float64) - x).abs()
    bound = x.abs().amax(-1, keepdim=True) / 254
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-30)
    assert torch.all(int8_dequantize(qx, s, torch.float64)[0, 0, 0] == 0)


@pytest.mark.parametrize("H,H_kv", [(4, 2), (2, 2)])
def test_int8_decode_error_is_bounded(H, H_kv):
    lengths = [40, 21]
    cache, k, v = filled(lengths, H_kv, 16, quantize="int8")
    q = rand((2, H, 1, 16), seed=3)
    out = decode(q, cache)
    ref, _ = oracle(q, k, v, lengths)
    # score perturbation eps <= scale * |q|_1 * max|k|/254; |do| <= (exp(2 eps) - 1) max|v| + max|v|/254
    scale = 16 ** -0.5
    G = H // H_kv
    kmax = k.abs().amax(-1).amax(-1)  # (B, H_kv)
    vmax = v.abs().amax(-1).amax(-1)
    eps = scale * q.abs().sum(-1).squeeze(-1) * kmax.repeat_interleave(G, 1) / 254
    bound = (torch.exp(2 * eps) - 1) * vmax.repeat_interleave(G, 1) + vmax.repeat_interleave(G, 1) / 254
    err = (out - ref).abs().amax(-1).squeeze(-1)
    assert torch.all(err <= bound) and err.max() > 0
    kr, vr = cache.reconstruct()
    assert torch.all((kr[0] - k[0]).abs() <= k[0].abs().amax(-1, keepdim=True) / 254 + 1e-12)


def test_all_options_compose():
    lengths = [300, 250]
    D = 16
    k = _lowrank_kv(2, 2, 300, D, 8)
    v = _lowrank_kv(2, 2, 300, D, 8, seed=20)
    proj = fit_pca(k, v).with_ranks(8)
    cache = KVCache(2, 2, 16, D, dtype=torch.float64, policy=TokenSelect(n_init=4, n_local=16, k=200),
                    compress="pca", projection=proj, quantize="int8")
    cache.append(k, v, n_new=lengths)
    assert cache.bytes_per_token() == 2 * 2 * (8 + 4)
    q = rand((2, 4, 1, D), seed=7)
    out = decode(q, cache)
    ref, _ = oracle(q, k, v, lengths)
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)
    assert cache.stats["selections"] == 1 and cos.min() > 0.99


def test_int8_chunked_dequantization_and_scratch_buffers_agree(monkeypatch):
    import importlib
    dm = importlib.import_module("anyattn.cache.decode")
    lengths = [40, 29]
    cache, k, v = filled(lengths, 2, 8, quantize="int8", policy=TokenSelect(n_init=2, n_local=3, k=6))
    q = rand((2, 4, 1, 8), seed=3)
    qg = q.clone().requires_grad_()
    want = decode(qg, cache, policy="exact")  # fresh buffers (q requires grad), one chunk
    monkeypatch.setattr(dm, "INT8_CHUNK", 7)
    with torch.no_grad():
        got = decode(q, cache, policy="exact")  # scratch buffers, 6 chunks merged by LSE
        sel = decode(q, cache)
    torch.testing.assert_close(got, want.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(sel, decode(qg, cache).detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("return_lse", [False, True])
def test_pca_rows_without_visible_keys_are_zero(return_lse):
    lengths = [3, 10]
    k, v = rand((2, 2, 10, 6)) + 1, rand((2, 2, 10, 6), seed=1) + 2  # mu_V != 0
    proj = fit_pca(k, v).with_ranks([6, 6], [6, 3])  # two groups
    cache = KVCache(2, 2, 8, 6, dtype=torch.float64, compress=proj)
    cache.append(k, v, n_new=lengths)
    q = rand((2, 2, 5, 6), seed=2)
    got = decode(q, cache, return_lse=return_lse)
    out = got[0] if return_lse else got
    assert torch.all(out[0, :, :2] == 0)  # sequence 0 has 3 keys: its first 2 of 5 queries see none
    ref, ref_lse = oracle(q, k, v, lengths)
    torch.testing.assert_close(out[:, :1], ref[:, :1], atol=1e-10, rtol=1e-10)  # head 0: full rank
    if return_lse:
        torch.testing.assert_close(got[1][:, :1], ref_lse[:, :1], atol=1e-10, rtol=1e-10)
