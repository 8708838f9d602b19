"""EcoFormer: hashing feature map (codes, straight-through gradient), linear attention with it against the
dense EcoFormer weights `h_i . h_j + b + 1` (both numerators, causal and not, state and steps), fit_ksh
(codes agree with the similarity labels better than the random start), bad inputs."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn import linear as L
from anyattn.linear.ecoformer import _similarity_labels


def hasher(H=2, D=6, m=5, b=4, seed=0, official_bias=False, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    anchors = F.normalize(torch.randn(H, m, D, generator=gen, dtype=dtype), dim=-1)
    return L.EcoformerFeatures(anchors, torch.randn(H, b, m, generator=gen, dtype=dtype),
                               torch.rand(H, m, generator=gen, dtype=dtype) * 0.3,
                               torch.rand(H, generator=gen, dtype=dtype) + 0.5, official_bias=official_bias)


def qkv(B=2, H=2, N=15, D=6, V=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=gen, dtype=torch.float64) for d in (D, D, V))


def dense(q, k, v, fm, causal, official):
    hq, hk = fm.codes(q), fm.codes(k)
    b = fm.num_bits
    w = hq @ hk.transpose(-1, -2) + (b + 1)
    N = q.shape[2]
    mask = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    w = w * mask
    den = w.sum(-1, keepdim=True)
    num = ((w - (b + 1) * mask) @ v + (b + 1) * v) if official else w @ v
    return num / den


def test_codes_and_features():
    fm = hasher()
    q, _, _ = qkv()
    h = fm.codes(q)
    assert h.shape == (2, 2, 15, 4) and set(h.unique().tolist()) <= {-1.0, 1.0}
    f = fm(q)
    assert f.shape == (2, 2, 15, 5) and torch.allclose(f[..., -1], torch.full_like(f[..., -1], math.sqrt(5)))
    # the codes are the signs of A (exp(-|x̂ - a|^2 / 2 sigma2) - centres), per head
    xn = F.normalize(q, dim=-1)
    kern = torch.exp(-(xn[..., :, None, :] - fm.anchors[:, None]).square().sum(-1) / (2 * fm.sigma2[:, None, None]))
    y = (kern - fm.centers[:, None]) @ fm.weights.transpose(-1, -2)
    assert torch.equal(h, torch.where(y > 0, 1.0, -1.0).to(h.dtype))


def test_straight_through_gradient():
    fm = hasher()
    q = qkv()[0].requires_grad_(True)
    g = torch.randn(2, 2, 15, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    (got,) = torch.autograd.grad((fm.codes(q) * g).sum(), q)
    q2 = q.detach().clone().requires_grad_(True)
    y = fm.logits(q2)
    (want,) = torch.autograd.grad((y * g * (y.abs() < 1)).sum(), q2)       # d sign := 1 on (-1, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.abs().sum() > 0


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("causal", [True, False])
def test_linear_attention_equals_dense(official, causal):
    fm = hasher(official_bias=official)
    q, k, v = qkv()
    o = L.linear_attention(q, k, v, feature_map=fm, normalize=True, causal=causal, scale=1.0, eps=0.0)
    torch.testing.assert_close(o, dense(q, k, v, fm, causal, official), rtol=1e-12, atol=1e-12)
    o2 = L.linear_attention(q, k, v, feature_map="ecoformer", normalize=True, causal=causal, scale=1.0, eps=0.0,
                            feature_options=dict(anchors=fm.anchors, weights=fm.weights, centers=fm.centers,
                                                 sigma2=fm.sigma2, official_bias=official), mode="recurrent")
    torch.testing.assert_close(o2, o, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("official", [False, True])
def test_state_and_steps(official):
    fm = hasher(official_bias=official, H=1)                             # one set of hash functions for all heads
    q, k, v = qkv(N=12)
    kw = dict(feature_map=fm, normalize=True, scale=1.0)
    o, S = L.linear_attention(q, k, v, output_final_state=True, **kw)
    oa, Sa = L.linear_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], output_final_state=True, **kw)
    ob, Sb = L.linear_attention(q[:, :, 5:9], k[:, :, 5:9], v[:, :, 5:9], initial_state=Sa, output_final_state=True, **kw)
    outs, st = [oa, ob], Sb
    for t in range(9, 12):
        o_t, st = L.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], st, **kw)
        outs.append(o_t[:, :, None])
    torch.testing.assert_close(torch.cat(outs, 2), o, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, S, rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=10)
@given(B=st.integers(1, 2), H=st.sampled_from([1, 2]), N=st.integers(1, 30), D=st.integers(1, 6), V=st.integers(1, 4),
       m=st.integers(1, 6), b=st.integers(1, 8), causal=st.booleans(), official=st.booleans(), seed=st.integers(0, 999))
def test_over_shapes(B, H, N, D, V, m, b, causal, official, seed):
    fm = hasher(H=H, D=D, m=m, b=b, seed=seed, official_bias=official)
    q, k, v = qkv(B=B, H=H, N=N, D=D, V=V, seed=seed + 1)
    o = L.linear_attention(q, k, v, feature_map=fm, normalize=True, causal=causal, scale=1.0, eps=0.0, chunk_size=8)
    torch.testing.assert_close(o, dense(q, k, v, fm, causal, official), rtol=1e-11, atol=1e-11)


def test_fit_ksh_codes_follow_the_labels():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 6, 8, generator=gen)
    x = centres[:, torch.randint(0, 6, (96,), generator=gen)] + 0.3 * torch.randn(2, 96, 8, generator=gen)
    x = x.reshape(1, 2, 96, 8)                                                # clustered samples, 2 heads
    fm = L.fit_ksh(x, num_bits=8, num_anchors=16, topk=8, iterations=60, seed=1)
    assert fm.anchors.shape == (2, 16, 8) and fm.weights.shape == (2, 8, 16) and fm(x).shape == (1, 2, 96, 9)
    S = _similarity_labels(F.normalize(x, dim=-1), 8)

    def ksh_loss(f):                                          # |H H^T - b S|^2 / (N b)^2, per head
        h = f.codes(x)
        return ((h @ h.transpose(-1, -2)) - f.num_bits * S).square().sum((0, 2, 3)) / (96 * f.num_bits) ** 2

    rand = L.EcoformerFeatures(fm.anchors, torch.randn(2, 8, 16, generator=gen), fm.centers, fm.sigma2)
    spectral = L.fit_ksh(x, num_bits=8, num_anchors=16, topk=8, iterations=0, seed=1)
    fitted, start, random = ksh_loss(fm), ksh_loss(spectral), ksh_loss(rand)
    assert (fitted < 0.75 * random).all() and (fitted <= 1.02 * start).all(), (fitted, start, random)


def test_bad_inputs():
    fm = hasher()
    with pytest.raises(ValueError, match=r"num_anchors must be <= the number of samples N = 10, got 11"):
        L.fit_ksh(torch.randn(1, 2, 10, 4), 4, 11)
    with pytest.raises(ValueError, match="topk must be <= N / 2 = 5"):
        L.fit_ksh(torch.randn(1, 2, 10, 4), 4, 3, topk=6)
    with pytest.raises(ValueError, match=r"centers must have shape \(H, m\) = \(2, 5\)"):
        L.EcoformerFeatures(fm.anchors, fm.weights, fm.centers[:, :4], fm.sigma2)
    with pytest.raises(ValueError, match="must divide the inputs' 3 heads"):
        fm(torch.randn(1, 3, 4, 6, dtype=torch.float64))
