import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
import anyattn.approx  # noqa: F401
from anyattn.approx.kernel_rpe import toeplitz_apply
from anyattn.approx.performer import projection
from anyattn.linear.feature_maps import performer_features
from anyattn.masks import Causal, Dense, KeyPadding

D64 = torch.float64


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D64)


def rel_bias(rpe, n_q, n_k):
    i = torch.arange(n_q).view(-1, 1)
    j = torch.arange(n_k).view(1, -1)
    return rpe[..., j - (i + n_k - n_q) + n_k - 1]


def dense_kernel_rpe(q, k, v, scale, w, rpe, allowed=None):
    """The same kernelized attention written densely: A = phi(q) phi(k)^T * exp(b_{rel}), masked, row-normalized."""
    r = math.sqrt(scale)
    a = performer_features(q * r, w) @ performer_features(k * r, w).mT * torch.exp(rel_bias(rpe, q.shape[2], k.shape[2]))
    if allowed is not None:
        a = a * allowed
    return torch.nan_to_num((a @ v) / a.sum(-1, keepdim=True))


def test_toeplitz_apply_matches_dense():
    n_q, n_k = 7, 11
    h = rand(n_q + n_k - 1)
    y = rand(2, n_k, 3)
    t = torch.stack([torch.stack([sum(h[j - i + n_q - 1] * y[b, j, c] for j in range(n_k)) for c in range(3)])
                     for b in range(2) for i in range(n_q)]).view(2, n_q, 3)
    torch.testing.assert_close(toeplitz_apply(h, y, n_q), t, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_q,n_k,mask", [(20, 20, None), (20, 20, Causal()), (9, 15, Causal()),
                                          (15, 9, Causal("top_left")), (9, 15, None)])
def test_matches_dense_formulation_outputs_and_grads(n_q, n_k, mask):
    H, D = 2, 6
    q = rand(1, H, n_q, D, scale=0.7, seed=1).requires_grad_()
    k = rand(1, H, n_k, D, scale=0.7, seed=2).requires_grad_()
    v = rand(1, H, n_k, 4, seed=3).requires_grad_()
    rpe = rand(H, n_q + n_k - 1, seed=4).requires_grad_()
    out = anyattn.attention(q, k, v, mask=mask, method="kernel_rpe", rpe=rpe, num_features=12, feature_chunk=5, seed=2)
    allowed = None if mask is None else mask.dense(1, H, n_q, n_k, None).to(D64)
    ref = dense_kernel_rpe(q, k, v, D ** -0.5, projection(D, 12, 2, dtype=D64), rpe, allowed)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    g = rand(1, H, n_q, 4, seed=5)
    ga = torch.autograd.grad((out * g).sum(), (q, k, v, rpe))
    gb = torch.autograd.grad((ref * g).sum(), (q, k, v, rpe))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_approximates_softmax_with_the_same_bias_and_equals_performer_without_rpe():
    q, k = rand(1, 2, 64, 8, scale=0.5, seed=1), rand(1, 2, 64, 8, scale=0.5, seed=2)
    v = rand(1, 2, 64, 8, seed=3)
    rpe = 0.5 * rand(127, seed=4)
    exact = anyattn.attention(q, k, v, method="reference", bias=rel_bias(rpe, 64, 64), mask=Causal())
    errs = [anyattn.approx.relative_errors(
        anyattn.attention(q, k, v, method="kernel_rpe", rpe=rpe, num_features=m, mask=Causal()), exact)[0]
        for m in (8, 512)]
    assert errs[1] < errs[0] and errs[1] < 0.1
    a = anyattn.attention(q, k, v, method="kernel_rpe", num_features=32, mask=Causal(), seed=3)
    b = anyattn.attention(q, k, v, method="performer", num_features=32, mask=Causal(), seed=3)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_key_padding_lse_and_determinism():
    q, k, v = rand(2, 1, 10, 4, seed=1), rand(2, 1, 10, 4, seed=2), rand(2, 1, 10, 4, seed=3)
    rpe = rand(19, seed=4)
    out, lse = anyattn.attention(q, k, v, mask=KeyPadding([10, 0]), method="kernel_rpe", rpe=rpe, return_lse=True)
    assert out[1].abs().max() == 0 and torch.isinf(lse[1]).all() and torch.isfinite(lse[0]).all()
    out2 = anyattn.attention(q, k, v, mask=KeyPadding([10, 0]), method="kernel_rpe", rpe=rpe)
    assert torch.equal(out, out2)


def test_refusals_and_bad_rpe():
    q = rand(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"rpe must have shape \(N_q \+ N_k - 1,\) = \(15,\) or \(H, N_q \+ N_k - 1\) "
                                         r"= \(2, 15\), got \(3, 15\)"):
        anyattn.attention(q, q, q, method="kernel_rpe", rpe=torch.zeros(3, 15, dtype=D64))
    with pytest.raises(TypeError, match="rpe must be a floating tensor, got torch.int64"):
        anyattn.attention(q, q, q, method="kernel_rpe", rpe=torch.zeros(15, dtype=torch.long))
    with pytest.raises(ValueError, match="pass a relative-position table as rpe= instead"):
        anyattn.attention(q, q, q, method="kernel_rpe", bias=torch.zeros(8, 8, dtype=D64))
    with pytest.raises(ValueError, match="kernel_rpe supports Causal and KeyPadding masks only"):
        anyattn.attention(q, q, q, method="kernel_rpe", mask=Dense(torch.ones(8, 8, dtype=torch.bool)))


@settings(deadline=None, max_examples=8)
@given(n_q=st.integers(1, 10), n_k=st.integers(1, 10), causal=st.booleans())
def test_property_matches_dense(n_q, n_k, causal):
    q, k, v = rand(1, 1, n_q, 4, seed=1), rand(1, 1, n_k, 4, seed=2), rand(1, 1, n_k, 3, seed=3)
    rpe = rand(n_q + n_k - 1, seed=4)
    m = Causal() if causal else None
    out = anyattn.attention(q, k, v, mask=m, method="kernel_rpe", rpe=rpe, num_features=6)
    allowed = None if m is None else m.dense(1, 1, n_q, n_k, None).to(D64)
    torch.testing.assert_close(out, dense_kernel_rpe(q, k, v, 0.5, projection(4, 6, 0, dtype=D64), rpe, allowed),
                               rtol=1e-9, atol=1e-10)
