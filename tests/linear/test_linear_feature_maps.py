"""linear_attention with each feature map against an explicit quadratic formula; Performer features."""
import math

import pytest
import torch
import torch.nn.functional as F

from anyattn import linear as L
from anyattn.linear.feature_maps import resolve_feature_map

B, H, N, K, V = 2, 2, 13, 8, 5


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for d in (K, K, V)]


def quadratic(fq, fk, v, scale, causal=True, normalize=False, eps=1e-6):
    s = scale * fq @ fk.transpose(-1, -2)
    if causal:
        s = s.tril()
    o = s @ v
    if normalize:
        o = o / (s.sum(-1, keepdim=True) + eps)
    return o


@pytest.mark.parametrize("name", ["elu1", "relu", "performer", "cosformer", "nalaformer"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_against_quadratic(name, causal, normalize):
    q, k, v = inputs()
    fq, fk = resolve_feature_map(name, K).map_qk(q, k, 0)
    fq, fk = fq.double(), fk.double()
    ref = quadratic(fq, fk, v, 0.7, causal, normalize)
    out = L.linear_attention(q, k, v, name, normalize=normalize, causal=causal, scale=0.7, chunk_size=4)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    if causal:
        rec = L.linear_attention(q, k, v, name, normalize=normalize, scale=0.7, mode="recurrent")
        torch.testing.assert_close(rec, ref, rtol=1e-9, atol=1e-9)


def test_user_callable_and_elu1():
    q, k, v = inputs(1)
    a = L.linear_attention(q, k, v, lambda x: F.elu(x) + 1)
    b = L.linear_attention(q, k, v, "elu1")
    torch.testing.assert_close(a, b)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    torch.testing.assert_close(a, quadratic(fq, fk, v, K ** -0.5))


def test_noncausal_initial_and_final_state():
    q, k, v = inputs(2)
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o, S = L.linear_attention(q, k, v, "relu", causal=False, initial_state=S0, output_final_state=True)
    fq, fk = F.relu(q), F.relu(k)
    torch.testing.assert_close(S, S0 + fk.transpose(-1, -2) @ v)
    torch.testing.assert_close(o, K ** -0.5 * fq @ S)


def test_steps_equal_full_cosformer_and_normalize():
    q, k, v = inputs(3)
    opts = {"max_len": 64}
    o, S = L.linear_attention(q, k, v, "cosformer", normalize=True, feature_options=opts, output_final_state=True)
    assert S.shape == (B, H, 2 * K, V + 1)
    state, outs = None, []
    for t in range(N):
        o_t, state = L.linear_attention_step(q[:, :, t], k[:, :, t], v[:, :, t], state, "cosformer", normalize=True,
                                             position=t, feature_options=opts)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), o)
    torch.testing.assert_close(state, S)


def test_orthogonal_gaussian():
    gen = torch.Generator().manual_seed(0)
    w = orth = L.orthogonal_gaussian(20, 8, gen, dtype=torch.float64)
    assert w.shape == (20, 8)
    blk = orth[:8] / orth[:8].norm(dim=1, keepdim=True)
    torch.testing.assert_close(blk @ blk.T, torch.eye(8, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    w2 = L.orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(w, w2)


def test_performer_features_estimate_softmax_kernel():
    gen = torch.Generator().manual_seed(0)
    d, m = 8, 8192
    x = torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.25
    y = torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.25
    W = L.orthogonal_gaussian(m, d, gen, dtype=torch.float64)
    est = L.performer_features(x, W) @ L.performer_features(y, W).T
    exact = torch.exp(x @ y.T)
    rel = (est - exact).abs() / exact  # a Monte Carlo estimate: loose bound
    assert rel.mean() < 0.05 and rel.max() < 0.15
    assert (L.performer_features(x, W) > 0).all()


def test_performer_seed_and_redraw():
    q, k, v = inputs(4)
    a = L.linear_attention(q, k, v, "performer", feature_options={"seed": 1, "num_features": 16})
    b = L.linear_attention(q, k, v, "performer", feature_options={"seed": 1, "num_features": 16})
    c = L.linear_attention(q, k, v, "performer", feature_options={"seed": 2, "num_features": 16})
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    fm = L.PerformerFeatures(K, num_features=16, seed=0, redraw=True)
    p0 = fm.projection.clone()
    L.linear_attention(q, k, v, fm)
    assert not torch.allclose(p0, fm.projection)
    fixed = L.PerformerFeatures(K, num_features=16, seed=0)
    p1 = fixed.projection.clone()
    L.linear_attention(q, k, v, fixed)
    torch.testing.assert_close(p1, fixed.projection)
    fixed.redraw()
    assert not torch.allclose(p1, fixed.projection)


def test_cosformer_reweighting():
    q, k, _ = inputs(5)
    fq, fk = L.CosformerFeatures(max_len=20).map_qk(q, k, 0)
    i = torch.arange(N, dtype=torch.float64)
    cosm = torch.cos(math.pi * (i[:, None] - i[None, :]) / 40)
    torch.testing.assert_close(fq @ fk.transpose(-1, -2), (F.relu(q) @ F.relu(k).transpose(-1, -2)) * cosm)


def test_nalaformer_features():
    q, k, _ = inputs(6)
    fq, fk = L.NalaformerFeatures().map_qk(q, k, 0)
    assert fq.shape == (B, H, N, 2 * K) and (fq >= 0).all() and (fk >= 0).all()
    torch.testing.assert_close(fk.norm(dim=-1), torch.ones(B, H, N, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # larger query norm -> spikier (higher power) query features
    u_small = fq[0, 0, 0] / fq[0, 0, 0].sum()
    fq2, _ = L.NalaformerFeatures().map_qk(q * 10, k, 0)
    u_big = fq2[0, 0, 0] / fq2[0, 0, 0].sum()
    assert u_big.max() >= u_small.max()


def test_gradients_through_feature_maps():
    q, k, v = [x.requires_grad_() for x in inputs(7)]
    o = L.linear_attention(q, k, v, "elu1", normalize=True)
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
