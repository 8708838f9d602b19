"""Flowformer: causal and non-causal forms against a dense transcription of the flow equations (float64,
outputs and gradients of q, k, v), steps == full call, calls compose, the clamp, bad inputs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from anyattn import linear as L


def make(B=2, H=2, N=17, M=None, D=4, V=3, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) * 2
    k = torch.randn(B, H, M, D, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(B, H, M, V, generator=gen, dtype=torch.float64)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def dense(q, k, v, causal, clamp=1.0, eps=1e-6):
    """Every sum written with an explicit (N, M) matrix of which tokens it runs over."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    N, M = q.shape[2], k.shape[2]
    W = torch.ones(N, M, dtype=q.dtype).tril() if causal else torch.ones(N, M, dtype=q.dtype)
    n = torch.arange(1, N + 1, dtype=q.dtype) if causal else None

    def dot(a, b):
        return ((a + eps) * (b + eps)).sum(-1)
    if causal:
        I = n / dot(fq, torch.einsum("ij,bhjd->bhid", W, fk))
        O = n / dot(fk, torch.einsum("ji,bhid->bhjd", W, fq))                        # sum over queries i <= j
        Ihat = dot(fq, torch.einsum("ij,bhjd->bhid", W, fk * O[..., None])) / n
        Ohat = (dot(fk, torch.einsum("ji,bhid->bhjd", W, fq * I[..., None])) / n).clamp(-clamp, clamp)
        A = torch.sigmoid(Ihat)
        e = torch.exp(Ohat)
        Cc = n * e / torch.einsum("jl,bhl->bhj", W, e)
        scores = torch.einsum("bhid,bhjd->bhij", fq * (I / n)[..., None], fk) * W
    else:
        I = 1 / dot(fq, fk.sum(2, keepdim=True))
        O = 1 / dot(fk, fq.sum(2, keepdim=True))
        Ihat = dot(fq, (fk * O[..., None]).sum(2, keepdim=True))
        Ohat = dot(fk, (fq * I[..., None]).sum(2, keepdim=True)).clamp(-clamp, clamp)
        A = torch.sigmoid(Ihat * N / M)
        Cc = M * torch.softmax(Ohat, -1)
        scores = torch.einsum("bhid,bhjd->bhij", fq * I[..., None], fk)
    return A[..., None] * (scores @ (v * Cc[..., None]))


@pytest.mark.parametrize("causal,N,M,clamp", [(True, 1, None, 1.0), (True, 37, None, 1.0), (True, 70, None, 5.0),
                                              (False, 23, None, 1.0), (False, 9, 14, 5.0)])
def test_against_dense_with_grads(causal, N, M, clamp):
    q, k, v = make(N=N, M=M, seed=N, requires_grad=True)
    o = L.flowformer(q, k, v, causal=causal, clamp=clamp)
    want = dense(q, k, v, causal, clamp)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(1))
    for a, b, name in zip(torch.autograd.grad((o * g).sum(), (q, k, v)), torch.autograd.grad((want * g).sum(), (q, k, v)), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {name}: {m}")


def test_clamp_matters():
    q, k, v = make(N=30, seed=3)
    q, k = q * 5, k * 5
    assert not torch.allclose(L.flowformer(q, k, v, clamp=1.0), L.flowformer(q, k, v, clamp=5.0))


def test_steps_and_split_calls_equal_the_full_call():
    q, k, v = make(N=29, seed=4)
    o, s = L.flowformer(q, k, v, output_final_state=True)
    oa, sa = L.flowformer(q[:, :, :12], k[:, :, :12], v[:, :, :12], output_final_state=True)
    ob, sb = L.flowformer(q[:, :, 12:20], k[:, :, 12:20], v[:, :, 12:20], initial_state=sa, output_final_state=True)
    outs, st_ = [oa, ob], sb
    for t in range(20, 29):
        o_t, st_ = L.flowformer_step(q[:, :, t], k[:, :, t], v[:, :, t], st_)
        outs.append(o_t[:, :, None])
    torch.testing.assert_close(torch.cat(outs, 2), o, rtol=1e-10, atol=1e-10)
    assert st_.count == s.count == 29
    for a, b in zip(st_[:6], s[:6]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@settings(deadline=None, max_examples=12)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40), D=st.integers(1, 6), V=st.integers(1, 5),
       causal=st.booleans(), seed=st.integers(0, 999))
def test_over_shapes(B, H, N, D, V, causal, seed):
    q, k, v = make(B=B, H=H, N=N, D=D, V=V, seed=seed)
    torch.testing.assert_close(L.flowformer(q, k, v, causal=causal), dense(q, k, v, causal), rtol=1e-9, atol=1e-9)


def test_float32():
    q, k, v = make(B=1, H=2, N=500, D=16, V=16, seed=5)
    o = L.flowformer(q.float(), k.float(), v.float())
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), dense(q, k, v, True), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    q, k, v = make(N=5)
    with pytest.raises(ValueError, match=r"clamp must be a finite float >= 0, got -1"):
        L.flowformer(q, k, v, clamp=-1)
    with pytest.raises(ValueError, match="need causal=True"):
        L.flowformer(q, k, v, causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="no grouped-query heads"):
        L.flowformer(torch.randn(2, 4, 5, 4, dtype=torch.float64), k, v)
    with pytest.raises(TypeError, match="initial_state must be a FlowformerState"):
        L.flowformer(q, k, v, initial_state=(1, 2))
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        L.flowformer(q, k[:, :, :4], v[:, :, :4])


@pytest.mark.parametrize("path", ["cumsum", "matmul"])
def test_both_prefix_paths_against_dense_with_grads_and_state(path, monkeypatch):
    """Short inputs take the elementwise prefix sums, long ones the width-1 linear attention: force each
    on a small input and check outputs, gradients and the continued state against the dense oracle."""
    import importlib
    F = importlib.import_module("anyattn.linear.flowformer")
    monkeypatch.setattr(F, "PREFIX_MATMUL_MIN", 0 if path == "matmul" else 1 << 60)
    q, k, v = make(N=70, M=70, seed=7, requires_grad=True)
    o = L.flowformer(q, k, v, causal=True)
    want = dense(q, k, v, True, 1.0)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(o.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        o1, st1 = L.flowformer(q[:, :, :33], k[:, :, :33], v[:, :, :33], initial_state=None, output_final_state=True)
        o2 = L.flowformer(q[:, :, 33:], k[:, :, 33:], v[:, :, 33:], initial_state=st1)
        torch.testing.assert_close(torch.cat([o1, o2], 2), want, rtol=1e-10, atol=1e-10)
