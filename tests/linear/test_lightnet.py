"""LightNet: against its closed form (float64, outputs and gradients of q, k_logits, v, initial state),
both z0 conventions, chunk == recurrent, steps == full call, calls compose, non-causal form, the blocked
log-cumsum-exp against torch's, bad inputs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from anyattn import linear as L
from anyattn.linear.lightnet import _logcumsumexp, _normalized_keys


def make(B=2, H=2, N=19, K=5, V=3, groups=1, seed=0, dtype=torch.float64, requires_grad=False, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H * groups, N, K, generator=gen, dtype=torch.float64).to(dtype)
    x = (torch.randn(B, H, N, K, generator=gen, dtype=torch.float64) * spread).to(dtype)
    v = torch.randn(B, H, N, V, generator=gen, dtype=torch.float64).to(dtype)
    if requires_grad:
        for t in (q, x, v):
            t.requires_grad_(True)
    return q, x, v


def closed_form(q, x, v, z0, scale=1.0, causal=True):
    """o_t = scale sum_c q_tc (sum_{s<=t} e^{x_sc} v_s) / (e^{z0} + sum_{s<=t} e^{x_sc}) (dense, float64)."""
    B, Hq, N, K = q.shape
    H = x.shape[1]
    w = torch.exp(x)                                                         # (B, H, N, K)
    mask = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
    num = torch.einsum("ts,bhsk,bhsv->bhtkv", mask.double(), w, v)
    den = torch.einsum("ts,bhsk->bhtk", mask.double(), w) + torch.exp(torch.tensor(z0, dtype=torch.float64))
    S = num / den[..., None]
    S = S.repeat_interleave(Hq // H, 1)
    return scale * torch.einsum("bhtk,bhtkv->bhtv", q, S)


@pytest.mark.parametrize("z0", [float("-inf"), 0.0])
@pytest.mark.parametrize("mode,causal,groups", [("chunk", True, 1), ("recurrent", True, 1), ("chunk", True, 2),
                                               ("chunk", False, 1), ("chunk", False, 3)])
def test_against_closed_form_with_grads(z0, mode, causal, groups):
    q, x, v = make(N=37, groups=groups, seed=1, requires_grad=True)
    o = L.lightnet(q, x, v, z0=z0, causal=causal, mode=mode, chunk_size=8, scale=0.7)
    want = closed_form(q, x, v, z0, 0.7, causal)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(2))
    for a, b, n in zip(torch.autograd.grad((o * g).sum(), (q, x, v)), torch.autograd.grad((want * g).sum(), (q, x, v)), "qkv"):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_state_carries_and_steps(causal):
    q, x, v = make(N=30, seed=3)
    o, st_ = L.lightnet(q, x, v, causal=causal, output_final_state=True, chunk_size=4)
    assert st_.S.shape == (2, 2, 5, 3) and st_.z.shape == (2, 2, 5)
    if not causal:
        # the non-causal state is the same global reduction: continuing adds the new tokens to it
        _, sa = L.lightnet(q[:, :, :11], x[:, :, :11], v[:, :, :11], causal=False, output_final_state=True)
        _, sb = L.lightnet(q[:, :, 11:], x[:, :, 11:], v[:, :, 11:], causal=False, initial_state=sa,
                           output_final_state=True)
        torch.testing.assert_close(sb.S, st_.S, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(sb.z, st_.z, rtol=1e-10, atol=1e-10)
        return
    oa, sa = L.lightnet(q[:, :, :11], x[:, :, :11], v[:, :, :11], output_final_state=True, chunk_size=4)
    outs, s = [oa], sa
    for t in range(11, 30):
        o_t, s = L.lightnet_step(q[:, :, t], x[:, :, t], v[:, :, t], s)
        outs.append(o_t[:, :, None])
    torch.testing.assert_close(torch.cat(outs, 2), o, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.S, st_.S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s.z, st_.z, rtol=1e-10, atol=1e-10)


def test_initial_state_gradients_match_recurrent():
    q, x, v = make(N=21, seed=4, requires_grad=True)
    gen = torch.Generator().manual_seed(5)
    S0 = torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z0 = torch.randn(2, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    outs = {}
    for mode in ("chunk", "recurrent"):
        o, s = L.lightnet(q, x, v, initial_state=L.LightNetState(S0, z0), mode=mode, chunk_size=8, output_final_state=True)
        loss = (o * o).sum() + (s.S * s.S).sum() + s.z.sum()
        outs[mode] = [o, s.S, s.z, *torch.autograd.grad(loss, (q, x, v, S0, z0))]
    for a, b in zip(outs["chunk"], outs["recurrent"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=15)
@given(N=st.integers(1, 200), K=st.integers(1, 4), spread=st.sampled_from([0.1, 3.0, 40.0, 400.0]),
       z0=st.sampled_from([float("-inf"), 0.0, 5.0]), seed=st.integers(0, 99))
def test_normalized_keys_against_torch(N, K, spread, z0, seed):
    """Blocked log-cumsum-exp equals torch's; the normalized keys, decays and final z and their hand-written
    gradients (x and the starting z) equal autograd through torch.logcumsumexp, including spreads that
    force the fallback path."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, 2, N, K, generator=gen, dtype=torch.float64) * spread).requires_grad_(True)
    zp = torch.full((1, 2, K), z0, dtype=torch.float64, requires_grad=True)
    if spread < 50:
        torch.testing.assert_close(_logcumsumexp(x, zp)[0], torch.logaddexp(zp[:, :, None], torch.logcumsumexp(x, 2)),
                                   rtol=1e-12, atol=1e-12)
    z = torch.logaddexp(zp[:, :, None], torch.logcumsumexp(x, 2))
    want = (torch.exp(x - z), torch.diff(z, dim=2, prepend=(zp if z0 > -1e9 else z[:, :, 0])[:, :, None]).neg(), z[:, :, -1])
    got = _normalized_keys(x, zp)
    cot = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    inputs = (x, zp) if z0 > -1e9 else (x,)
    ga = torch.autograd.grad(sum((a * c).sum() for a, c in zip(got, cot)), inputs)
    gb = torch.autograd.grad(sum((b * c).sum() for b, c in zip(want, cot)), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + spread))


@settings(deadline=None, max_examples=10)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40), K=st.integers(1, 6), V=st.integers(1, 5),
       chunk=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 999))
def test_chunk_equals_closed_form_over_shapes(B, H, N, K, V, chunk, seed):
    q, x, v = make(B=B, H=H, N=N, K=K, V=V, seed=seed)
    torch.testing.assert_close(L.lightnet(q, x, v, chunk_size=chunk), closed_form(q, x, v, float("-inf")),
                               rtol=1e-9, atol=1e-9)


def test_float32_large_logits():
    q, x, v = make(B=1, H=2, N=300, K=8, V=8, seed=6, spread=30.0)
    o = L.lightnet(q.float(), x.float(), v.float())
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.double(), closed_form(q, x, v, float("-inf")), rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    q, x, v = make(N=4)
    with pytest.raises(ValueError, match=r"z0 must be a float in \[-inf, inf\), got nan"):
        L.lightnet(q, x, v, z0=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool"):
        L.lightnet(q, x, v, causal=1)
    with pytest.raises(TypeError, match="initial_state must be a LightNetState"):
        L.lightnet(q, x, v, initial_state=torch.zeros(2, 2, 5, 3))
    with pytest.raises(ValueError, match=r"state.z must have shape \(B, H, D_k\) = \(2, 2, 5\), got \(2, 2, 4\)"):
        L.lightnet_step(q[:, :, 0], x[:, :, 0], v[:, :, 0], L.LightNetState(torch.zeros(2, 2, 5, 3), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match=r"v must have shape"):
        L.lightnet(q, x, v[:, :, :3])
