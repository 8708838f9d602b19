import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
import anyattn.approx  # noqa: F401  (registers the approximate methods)
from anyattn.approx.performer import favor_features, projection
from anyattn.linear.feature_maps import performer_features
from anyattn.masks import Causal, Document, KeyPadding

D64 = torch.float64


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D64)


def dense_performer(q, k, v, scale, w, allowed=None):
    """Dense formulation of the same approximation: A = phi(q) phi(k)^T (same features), masked,
    row-normalized, times v."""
    r = math.sqrt(scale)
    fq = performer_features(q * r, w)
    fk = performer_features(k * r, w)
    a = fq @ fk.transpose(-1, -2)
    if allowed is not None:
        a = a * allowed
    return (a @ v) / a.sum(-1, keepdim=True), torch.log(a.sum(-1))


def test_shares_the_linear_feature_map():
    x = rand(2, 3, 10, 8, scale=0.5)
    w = projection(8, 32, seed=3, dtype=D64)
    for per_row in (True, False):
        phi, shift = favor_features(x, w, per_row)
        torch.testing.assert_close(phi * torch.exp(shift), performer_features(x, w), rtol=1e-12, atol=1e-14)
    from anyattn.linear.feature_maps import orthogonal_gaussian
    torch.testing.assert_close(w, orthogonal_gaussian(32, 8, torch.Generator().manual_seed(3), dtype=D64))


@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_formulation_outputs_lse_and_grads(causal):
    B, H, N, D = 2, 2, 37, 8
    q, k, v = (rand(B, H, N, D, scale=0.6, seed=i).requires_grad_() for i in range(3))
    mask = Causal() if causal else None
    out, lse = anyattn.attention(q, k, v, mask=mask, method="performer", num_features=24, seed=5, chunk_size=8,
                                 return_lse=True)
    w = projection(D, 24, seed=5, dtype=D64)
    allowed = torch.ones(N, N, dtype=D64).tril() if causal else None
    ref, ref_lse = dense_performer(q, k, v, D ** -0.5, w, allowed)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = rand(B, H, N, D, seed=9)
    grads = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * g).sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n_q,n_k,align", [(5, 12, "bottom_right"), (12, 5, "bottom_right"), (5, 12, "top_left"),
                                          (1, 9, "bottom_right")])
def test_causal_alignment_and_key_padding(n_q, n_k, align):
    B, H, D = 2, 1, 4
    q, k, v = rand(B, H, n_q, D, seed=1), rand(B, H, n_k, D, seed=2), rand(B, H, n_k, 3, seed=3)
    w = projection(D, 16, seed=0, dtype=D64)
    m = Causal(align)
    allowed = m.dense(B, H, n_q, n_k, None).to(D64)
    out = anyattn.attention(q, k, v, mask=m, method="performer", num_features=16, chunk_size=4)
    ref, _ = dense_performer(q, k, v, D ** -0.5, w, allowed)
    ref = torch.nan_to_num(ref)  # rows that see no key: 0
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    lengths = torch.tensor([n_k, max(1, n_k // 2)])
    out = anyattn.attention(q, k, v, mask=KeyPadding(lengths), method="performer", num_features=16)
    kp = (torch.arange(n_k).view(1, -1) < lengths.view(-1, 1)).to(D64).view(B, 1, 1, n_k)
    ref, _ = dense_performer(q, k, v, D ** -0.5, w, kp)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_error_falls_as_features_grow():
    q, k = rand(1, 2, 256, 16, scale=0.5, seed=0), rand(1, 2, 256, 16, scale=0.5, seed=1)
    v = rand(1, 2, 256, 16, seed=2)
    errs = []
    for m in (16, 128, 1024):
        e = [anyattn.approx.error(q, k, v, "performer", num_features=m, seed=s).frobenius for s in range(3)]
        errs.append(sum(e) / len(e))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.15


def test_deterministic_under_seed_and_gqa():
    q, k, v = rand(1, 4, 20, 8, seed=0), rand(1, 2, 20, 8, seed=1), rand(1, 2, 20, 8, seed=2)
    a = anyattn.attention(q, k, v, method="performer", seed=7)
    b = anyattn.attention(q, k, v, method="performer", seed=7)
    c = anyattn.attention(q, k, v, method="performer", seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = anyattn.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), method="performer", seed=7)
    torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_low_precision_and_large_norms_stay_finite():
    q, k, v = (rand(1, 2, 64, 16, scale=8.0, seed=i).float() for i in range(3))
    out = anyattn.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), method="performer")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out = anyattn.attention(q, k, v, method="performer", mask=Causal())
    assert torch.isfinite(out).all()


def test_refusals_and_bad_options():
    q = rand(1, 1, 8, 4)
    with pytest.raises(ValueError, match="performer supports Causal and KeyPadding masks only"):
        anyattn.attention(q, q, q, method="performer", mask=Document(torch.tensor([0] * 4 + [1] * 4)))
    with pytest.raises(ValueError, match="performer does not support bias="):
        anyattn.attention(q, q, q, method="performer", bias=torch.zeros(8, 8, dtype=D64))
    with pytest.raises(ValueError, match="num_features must be >= 1, got 0"):
        anyattn.attention(q, q, q, method="performer", num_features=0)
    with pytest.raises(TypeError, match="seed must be an int or None, got str"):
        anyattn.attention(q, q, q, method="performer", seed="x")


@settings(deadline=None, max_examples=10)
@given(n_q=st.integers(1, 12), n_k=st.integers(1, 12), causal=st.booleans(), chunk=st.integers(1, 5))
def test_property_matches_dense(n_q, n_k, causal, chunk):
    q, k, v = rand(1, 2, n_q, 4, seed=1), rand(1, 2, n_k, 4, seed=2), rand(1, 2, n_k, 3, seed=3)
    m = Causal() if causal else None
    out = anyattn.attention(q, k, v, mask=m, method="performer", num_features=8, chunk_size=chunk)
    allowed = m.dense(1, 2, n_q, n_k, None).to(D64) if causal else None
    ref, _ = dense_performer(q, k, v, 0.5, projection(4, 8, 0, dtype=D64), allowed)
    torch.testing.assert_close(out, torch.nan_to_num(ref), rtol=1e-9, atol=1e-10)
