"""Local Linear Attention: the dense form against a per-query loop of the definition; the blocked form
(conjugate gradient, hand-written backward) against the dense form in float64 (outputs and gradients of
q, k, v), grouped-query heads, N_q != N_k, empty rows; lam -> infinity is softmax; fp32 error and the
reported residual; bad inputs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
from anyattn import masks

LLA = anyattn.local_linear_attention


def make(B=2, H=4, Hkv=2, Nq=29, Nk=29, D=5, Dv=3, seed=0, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64),
          torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in xs]


def loop_oracle(q, k, v, lam, scale, causal):
    """For each query: weights, omega, mu, M2 = sum w d d^T + lam omega I, rho = M2^-1 mu, the output."""
    B, H, Nq, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            K, V = k[b, h // G], v[b, h // G]
            for i in range(Nq):
                keys = range(i + K.shape[0] - Nq + 1) if causal else range(K.shape[0])
                if len(keys) == 0:
                    continue
                Kj, Vj = K[list(keys)], V[list(keys)]
                s = scale * Kj @ q[b, h, i]
                w = torch.exp(s - s.max())
                d = Kj - q[b, h, i]
                om, mu = w.sum(), (w[:, None] * d).sum(0)
                M2 = (w[:, None, None] * d[:, :, None] * d[:, None, :]).sum(0) + lam * om * torch.eye(D, dtype=q.dtype)
                rho = torch.linalg.solve(M2, mu)
                out[b, h, i] = ((w * (1 - d @ rho))[:, None] * Vj).sum(0) / (om - mu @ rho)
    return out


@pytest.mark.parametrize("causal,Nq,Nk", [(True, 9, 9), (False, 7, 11), (True, 6, 10), (True, 9, 5)])
def test_dense_is_the_definition(causal, Nq, Nk):
    q, k, v = make(B=1, H=2, Hkv=1, Nq=Nq, Nk=Nk, D=3, seed=Nq + Nk, requires_grad=False)
    got = LLA(q, k, v, lam=0.7, scale=0.9, is_causal=causal, mode="dense")
    torch.testing.assert_close(got, loop_oracle(q, k, v, 0.7, 0.9, causal), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("causal,Nq,Nk,lam", [(True, 29, 29, 10.0), (False, 23, 31, 1.0), (True, 17, 40, 0.3),
                                              (True, 12, 7, 2.0)])
def test_blocked_equals_dense_with_grads(causal, Nq, Nk, lam):
    q, k, v = make(Nq=Nq, Nk=Nk, seed=Nq * Nk)
    kw = dict(lam=lam, is_causal=causal)
    dense = LLA(q, k, v, mode="dense", **kw)
    blocked = LLA(q, k, v, mode="blocked", cg_iters=40, cg_tol=0.0, block_q=4, **kw)
    torch.testing.assert_close(blocked, dense, rtol=1e-10, atol=1e-10)
    g = torch.randn(dense.shape, dtype=dense.dtype, generator=torch.Generator().manual_seed(1))
    for a, b, n in zip(torch.autograd.grad((blocked * g).sum(), (q, k, v)), torch.autograd.grad((dense * g).sum(), (q, k, v)), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{n}: {m}")


def test_empty_rows_are_zero():
    q, k, v = make(Nq=10, Nk=4, seed=3)                          # bottom-right causal: the first 6 rows see no key
    for mode in ("dense", "blocked"):
        o = LLA(q, k, v, mode=mode)
        assert torch.all(o[:, :, :6] == 0) and torch.isfinite(o).all()
        (dq,) = torch.autograd.grad(o.sum(), q)
        assert torch.all(dq[:, :, :6] == 0) and torch.isfinite(dq).all()


def test_large_lam_is_softmax():
    q, k, v = make(requires_grad=False)
    want = anyattn.attention(q, k, v, mask=masks.Causal(), method="reference")
    for mode in ("dense", "blocked"):
        torch.testing.assert_close(LLA(q, k, v, lam=1e10, mode=mode), want, rtol=1e-8, atol=1e-8)


def test_float32_error_and_residual():
    q, k, v = make(B=1, H=4, Hkv=4, Nq=300, Nk=300, D=32, Dv=32, requires_grad=False)
    want = LLA(q, k, v, mode="dense")
    o, res = LLA(q.float(), k.float(), v.float(), mode="blocked", return_residual=True)
    assert o.dtype == torch.float32 and res.shape == (1, 4, 300)
    assert float(((o.double() - want).norm() / want.norm())) < 1e-5 and float(res.max()) < 1e-5
    o2, res2 = LLA(q.float(), k.float(), v.float(), mode="blocked", cg_iters=2, cg_tol=0.0, return_residual=True)
    err2 = float(((o2.double() - want).norm() / want.norm()))
    assert float(res2.max()) > 1e-3 and err2 > 1e-4                 # too few iterations: the residual says so
    _, res_dense = LLA(q.float(), k.float(), v.float(), mode="dense", return_residual=True)
    assert torch.all(res_dense == 0)


@settings(deadline=None, max_examples=10)
@given(Hkv=st.sampled_from([1, 2, 4]), Nq=st.integers(1, 24), Nk=st.integers(1, 24), D=st.integers(1, 6),
       Dv=st.integers(1, 4), causal=st.booleans(), bq=st.sampled_from([1, 3, 64]), seed=st.integers(0, 999))
def test_blocked_equals_dense_over_shapes(Hkv, Nq, Nk, D, Dv, causal, bq, seed):
    q, k, v = make(Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, Dv=Dv, seed=seed)
    dense = LLA(q, k, v, mode="dense", is_causal=causal, lam=3.0)
    blocked = LLA(q, k, v, mode="blocked", is_causal=causal, lam=3.0, block_q=bq, cg_iters=3 * D, cg_tol=0.0)
    torch.testing.assert_close(blocked, dense, rtol=1e-9, atol=1e-9)
    (a,) = torch.autograd.grad(blocked.square().sum(), k)
    (b,) = torch.autograd.grad(dense.square().sum(), k)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_bad_inputs():
    q, k, v = make(requires_grad=False)
    with pytest.raises(ValueError, match=r"lam must be a finite float > 0, got 0"):
        LLA(q, k, v, lam=0)
    with pytest.raises(ValueError, match=r"mode must be one of \['auto', 'dense', 'blocked'\], got 'cg'"):
        LLA(q, k, v, mode="cg")
    with pytest.raises(ValueError, match="cg_iters must be >= 1, got 0"):
        LLA(q, k, v, cg_iters=0)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        LLA(q, k, v, is_causal=None)
    with pytest.raises(ValueError, match="v must have k's sequence length"):
        LLA(q, k, v[:, :, :5])
