"""Titans linear memory: chunk form against the token loop (float64: outputs, states, gradients of every
input), the token loop against the definition (autograd gradient of the memory loss), the
reparametrization to Gated DeltaNet, mid-chunk continuation, steps, degenerate gates, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn import linear as L
from anyattn.linear import TitansState


def make(B=2, H=2, N=23, K=5, V=3, seed=0, dtype=torch.float64, requires_grad=False, state=True):
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    def ru(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64)

    out = dict(q=rn(B, H, N, K).to(dtype), k=(F.normalize(rn(B, H, N, K), dim=-1)).to(dtype), v=rn(B, H, N, V).to(dtype),
               theta=ru(B, H, N) * 0.8, alpha=ru(B, H, N) * 0.3, eta=ru(B, H, N))
    if state:
        out["M0"], out["S0"] = rn(B, H, K, V) * 0.5, rn(B, H, K, V) * 0.5
    if requires_grad:
        for x in out.values():
            x.requires_grad_(True)
    return out


def run(inp, **kw):
    st_ = (inp["M0"], inp["S0"]) if "M0" in inp else None
    return L.titans(inp["q"], inp["k"], inp["v"], inp["theta"], inp["alpha"], inp["eta"], initial_state=st_,
                    output_final_state=True, **kw)


def grads(o, state, inp, seed=5):
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    for x in (state.M, state.S):
        loss = loss + (x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum()
    return dict(zip(inp, torch.autograd.grad(loss, list(inp.values()))))


def close(a, b, tol=1e-9, what=""):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def same_state(s1, s2, tol=1e-9):
    for name in ("M", "S", "M_ref"):
        close(getattr(s1, name), getattr(s2, name), tol, name)
    assert s1.offset == s2.offset


@pytest.mark.parametrize("N,C", [(1, 16), (5, 16), (16, 16), (23, 4), (37, 16), (40, 1), (33, 3)])
def test_chunk_equals_recurrence_with_grads(N, C):
    inp = make(N=N, seed=N + C, requires_grad=True)
    o1, s1 = run(inp, chunk_size=C)
    o2, s2 = run(inp, chunk_size=C, mode="recurrent")
    assert o1.shape == (2, 2, N, 3) and s1.M.shape == (2, 2, 5, 3) and s1.offset == N % C
    close(o1, o2, what="o")
    same_state(s1, s2)
    g1, g2 = grads(o1, s1, inp), grads(o2, s2, inp)
    for name in g1:
        close(g1[name], g2[name], what=f"grad of {name}")


def test_recurrence_is_gradient_descent_on_the_memory_loss():
    """The oracle's update against the definition: the surprise is the autograd gradient of
    1/2 |k M_ref - v|^2 with respect to the memory, taken at the chunk-start memory."""
    inp = make(B=1, H=2, N=11, state=False)
    C, scale = 4, 0.7
    q, k, v, th, al, et = (inp[n] for n in ("q", "k", "v", "theta", "alpha", "eta"))
    M = torch.zeros(1, 2, 5, 3, dtype=torch.float64)
    S = torch.zeros_like(M)
    outs = []
    for t in range(11):
        if t % C == 0:
            M_ref = M.clone()
        W = M_ref.clone().requires_grad_(True)
        loss = 0.5 * ((k[:, :, t, None, :] @ W)[:, :, 0] - v[:, :, t]).square().sum()
        (grad,) = torch.autograd.grad(loss, W)
        S = et[:, :, t, None, None] * S - th[:, :, t, None, None] * grad
        M = (1 - al[:, :, t, None, None]) * M + S
        outs.append(scale * (q[:, :, t, None, :] @ M)[:, :, 0])
    want = torch.stack(outs, 2)
    for mode in ("recurrent", "chunk"):
        o, s = L.titans(q, k, v, th, al, et, chunk_size=C, scale=scale, mode=mode, output_final_state=True)
        close(o, want, 1e-12, mode)
        close(s.M, M, 1e-12, mode)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_equals_gated_delta_rule_without_momentum(mode):
    """eta = 0, chunk_size = 1: S_t = -theta_t k_t^T (k_t M_{t-1} - v_t), so
    M_t = (1 - alpha_t) (I - theta_t / (1 - alpha_t) k^T k) M_{t-1} + theta_t k^T v: Gated DeltaNet with
    g = log(1 - alpha), beta = theta / (1 - alpha) and values (1 - alpha) v."""
    inp = make(B=2, H=3, N=50, K=6, V=4, seed=3, requires_grad=True, state=False)
    q, k, v, th, al = (inp[n] for n in ("q", "k", "v", "theta", "alpha"))
    o = L.titans(q, k, v, th, al, torch.zeros_like(th), chunk_size=1, mode=mode)
    keep = 1 - al
    want = L.gated_delta_rule(q, k, keep[..., None] * v, torch.log(keep), th / keep, scale=6 ** -0.5,
                              mode="recurrent")
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(o.shape, dtype=o.dtype, generator=torch.Generator().manual_seed(0))
    for a, b in zip(torch.autograd.grad((o * g).sum(), (q, k, v, th, al)), torch.autograd.grad((want * g).sum(), (q, k, v, th, al))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_zero_momentum_and_full_forgetting_are_exact():
    """eta = 0 and alpha = 1 (a product with a zero factor): outputs as the token loop, gradients finite and
    equal to the loop's for q, k, v, theta (the log-decay of an exact zero is clamped at e^-80)."""
    inp = make(N=30, seed=9, state=True)
    inp["eta"][:, :, ::3] = 0.0
    inp["alpha"][:, :, 5::7] = 1.0
    for x in inp.values():
        x.requires_grad_(True)
    o1, s1 = run(inp, chunk_size=8)
    o2, s2 = run(inp, chunk_size=8, mode="recurrent")
    close(o1, o2, what="o")
    same_state(s1, s2)
    g1, g2 = grads(o1, s1, inp), grads(o2, s2, inp)
    for name in g1:
        assert torch.isfinite(g1[name]).all(), name
        if name not in ("alpha", "eta"):
            close(g1[name], g2[name], what=f"grad of {name}")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_steps_equal_the_full_call_from_mid_chunk(mode):
    inp = make(N=21, seed=4, state=True)
    C = 8
    o, s = run(inp, chunk_size=C)
    a = {n: (x[:, :, :5] if x.dim() >= 3 and x.shape[2] == 21 else x) for n, x in inp.items()}
    oa, st_ = run(a, chunk_size=C, mode=mode)                      # stops in the middle of the first chunk
    assert st_.offset == 5
    outs = [oa]
    for t in range(5, 21):
        o_t, st_ = L.titans_step(*(inp[n][:, :, t] for n in ("q", "k", "v", "theta", "alpha", "eta")), st_,
                                 chunk_size=C)
        outs.append(o_t[:, :, None])
    close(torch.cat(outs, 2), o, what="o")
    same_state(st_, s)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 45), K=st.integers(1, 7), V=st.integers(1, 6),
       C=st.sampled_from([1, 2, 3, 5, 8, 16, 64]), split=st.integers(0, 45), seed=st.integers(0, 999))
def test_chunk_equals_recurrence_and_calls_compose(B, H, N, K, V, C, split, seed):
    inp = make(B=B, H=H, N=N, K=K, V=V, seed=seed)
    o1, s1 = run(inp, chunk_size=C)
    o2, s2 = run(inp, chunk_size=C, mode="recurrent")
    close(o1, o2, what="o")
    same_state(s1, s2)
    split = min(split, N)
    a = {n: (x[:, :, :split] if x.dim() >= 3 and n not in ("M0", "S0") else x) for n, x in inp.items()}
    b = {n: x[:, :, split:] for n, x in inp.items() if n not in ("M0", "S0")}
    oa, sa = run(a, chunk_size=C) if split else (o1[:, :, :0], TitansState(inp["M0"], inp["S0"], inp["M0"], 0))
    if split < N:
        ob, sb = L.titans(*(b[n] for n in ("q", "k", "v", "theta", "alpha", "eta")), chunk_size=C, initial_state=sa,
                          output_final_state=True)
    else:
        ob, sb = o1[:, :, :0], sa
    close(torch.cat([oa, ob], 2), o1, what="split")
    same_state(sb, s1)


def test_float32_against_float64():
    inp = make(B=1, H=4, N=300, K=16, V=16, seed=2, dtype=torch.float32)
    inp64 = {n: x.double() for n, x in inp.items()}
    o32, s32 = run(inp, chunk_size=16)
    o64, _ = run(inp64, chunk_size=16, mode="recurrent")
    assert o32.dtype == torch.float32 and s32.M.dtype == torch.float32
    torch.testing.assert_close(o32.double(), o64, rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    th = al = et = torch.rand(1, 2, 6)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got values in \[-"):
        L.titans(q, k, v, th, al - 1, et)
    with pytest.raises(ValueError, match=r"eta must have shape \(B, H, N\) = \(1, 2, 6\), got \(1, 2, 5\)"):
        L.titans(q, k, v, th, al, et[..., :5])
    with pytest.raises(ValueError, match="titans has no grouped-query heads"):
        L.titans(torch.randn(1, 4, 6, 4), k, v, th, al, et)
    with pytest.raises(TypeError, match="initial_state must be a TitansState or a pair"):
        L.titans(q, k, v, th, al, et, initial_state=torch.zeros(1, 2, 4, 3))
    with pytest.raises(ValueError, match=r"initial_state.S must have shape \(B, H, D_k, D_v\)"):
        L.titans(q, k, v, th, al, et, initial_state=(torch.zeros(1, 2, 4, 3), torch.zeros(1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"state.offset must be an int in \[0, chunk_size=4\), got 4"):
        z = torch.zeros(1, 2, 4, 3)
        L.titans_step(q[:, :, 0], k[:, :, 0], v[:, :, 0], th[..., 0], al[..., 0], et[..., 0],
                      TitansState(z, z, z, 4), chunk_size=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        L.titans(q, k, v, th, al, et, mode="scan")
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        L.titans(q, k, v, th, al, et, chunk_size=0)


def test_mid_chunk_state_gradients():
    """Starting from a TitansState in the middle of a chunk (its own M_ref): chunk == loop, gradients of
    M, S, M_ref and every input, and of the returned state's M_ref."""
    inp = make(N=19, seed=12, state=False, requires_grad=True)
    gen = torch.Generator().manual_seed(13)
    M, S, R = (torch.randn(2, 2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    res = {}
    for mode in ("chunk", "recurrent"):
        o, s = L.titans(*(inp[n] for n in ("q", "k", "v", "theta", "alpha", "eta")), chunk_size=8, mode=mode,
                        initial_state=TitansState(M, S, R, 3), output_final_state=True)
        loss = (o * o).sum() + (s.M * s.S).sum() + (s.M_ref ** 2).sum()
        res[mode] = [o, s.M, s.S, s.M_ref, *torch.autograd.grad(loss, [*inp.values(), M, S, R])]
    for a, b in zip(res["chunk"], res["recurrent"]):
        close(a, b)
