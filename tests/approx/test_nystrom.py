import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
import anyattn.approx  # noqa: F401
from anyattn.approx.nystrom import iterative_pinv, newton_schulz_pinv, nystrom_attention, segment_means, soft_attention
from anyattn.masks import Causal

D64 = torch.float64


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D64)


def test_segment_means():
    x = rand(2, 10, 3)
    got = segment_means(x, 3)  # segments [0,3) [3,6) [6,10)
    want = torch.stack([x[:, 0:3].mean(1), x[:, 3:6].mean(1), x[:, 6:10].mean(1)], 1)
    torch.testing.assert_close(got, want)


def test_pseudo_inverse_iterations_converge():
    a = torch.softmax(rand(2, 6, 6), -1)
    torch.testing.assert_close(iterative_pinv(a, 40), torch.linalg.pinv(a), rtol=1e-8, atol=1e-8)
    x = rand(6, 3)
    spd = torch.exp(-torch.cdist(x, x) ** 2 / 2)
    torch.testing.assert_close(newton_schulz_pinv(spd, 80), torch.linalg.pinv(spd), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method,opts", [("nystrom", {"pinv": "exact"}), ("nystrom", {"pinv_iterations": 60}),
                                         ("soft", {"pinv": "exact"}), ("soft", {"newton_iterations": 80})])
def test_exact_when_landmarks_cover_the_sequence(method, opts):
    q, k = rand(1, 2, 24, 8, scale=0.5, seed=1), rand(1, 2, 24, 8, scale=0.5, seed=2)
    v = rand(1, 2, 24, 8, seed=3)
    out = anyattn.attention(q, k, v, method=method, num_landmarks=24, **opts)
    ref = anyattn.attention(q, k, v, method="reference")
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["nystrom", "soft"])
def test_error_falls_with_more_landmarks(method):
    q, k = rand(1, 2, 96, 16, scale=0.5, seed=1), rand(1, 2, 96, 16, scale=0.5, seed=2)
    v = rand(1, 2, 96, 16, seed=3)
    e = [anyattn.approx.error(q, k, v, method, num_landmarks=m, pinv="exact").frobenius for m in (4, 24, 96)]
    assert e[0] > e[1] > e[2] and e[2] < 1e-6


@pytest.mark.parametrize("fn", [nystrom_attention, soft_attention])
def test_gradients_match_numerical(fn):
    q, k, v = (rand(1, 1, 9, 3, scale=0.5, seed=i).requires_grad_() for i in range(3))
    assert torch.autograd.gradcheck(lambda q, k, v: fn(q, k, v, 0.6, 4), (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_dense_formulation_and_gqa():
    q, k, v = rand(1, 4, 20, 8, seed=1), rand(1, 2, 20, 8, seed=2), rand(1, 2, 20, 5, seed=3)
    out = anyattn.attention(q, k, v, method="nystrom", num_landmarks=5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 8 ** -0.5
    ql, kl = segment_means(q, 5), segment_means(kk, 5)
    approx_matrix = torch.softmax(s * q @ kl.mT, -1) @ iterative_pinv(torch.softmax(s * ql @ kl.mT, -1), 6) \
        @ torch.softmax(s * ql @ kk.mT, -1)
    torch.testing.assert_close(out, approx_matrix @ vv, rtol=1e-9, atol=1e-10)
    assert torch.equal(out, anyattn.attention(q, k, v, method="nystrom", num_landmarks=5, seed=3))


def test_refusals():
    q = rand(1, 1, 8, 4)
    for name in ("nystrom", "soft"):
        with pytest.raises(ValueError, match=f"{name} supports no mask only, got mask Causal"):
            anyattn.attention(q, q, q, method=name, mask=Causal())
        with pytest.raises(ValueError, match=f"{name} computes no LSE"):
            anyattn.attention(q, q, q, method=name, return_lse=True)
    with pytest.raises(ValueError, match=r"pinv must be one of \['iterative', 'exact'\], got 'newton'"):
        anyattn.attention(q, q, q, method="nystrom", pinv="newton")


@settings(deadline=None, max_examples=8)
@given(n_q=st.integers(1, 16), n_k=st.integers(1, 16), m=st.integers(1, 20), method=st.sampled_from(["nystrom", "soft"]))
def test_property_shapes_and_finite(n_q, n_k, m, method):
    q, k, v = rand(1, 2, n_q, 4, seed=1), rand(1, 2, n_k, 4, seed=2), rand(1, 2, n_k, 3, seed=3)
    out = anyattn.attention(q.float(), k.float(), v.float(), method=method, num_landmarks=m)
    assert out.shape == (1, 2, n_q, 3) and out.dtype == torch.float32 and torch.isfinite(out).all()
    if m >= max(n_q, n_k) and method == "nystrom":
        ref = anyattn.attention(q, k, v, method="reference")
        got = anyattn.attention(q, k, v, method=method, num_landmarks=m, pinv="exact")
        if n_q == n_k:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
