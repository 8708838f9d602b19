"""Mixture-of-Memories: chunk mode against the token loop (float64, outputs, final states, gradients of
every input), against an independent oracle built from `gated_delta_rule` on each memory's routed
subsequence, steps against the full call, and bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn import linear as L


def make(B=2, H=2, M=4, N=23, K=5, V=3, top_k=2, per_head=False, seed=0, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q = F.normalize(rn(B, H, N, K), dim=-1)
    k = F.normalize(rn(B, H, M, N, K), dim=-1)
    v = rn(B, H, M, N, V)
    g = F.logsigmoid(rn(B, H, M, N) + 1.0)
    beta = torch.rand(B, H, M, N, generator=gen, dtype=torch.float64)
    logits = rn(B, *((H,) if per_head else ()), N, M)
    top = logits.topk(top_k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
    S0 = rn(B, H, M, K, V) * 0.5
    out = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), g=g, beta=beta, weights=weights, initial_state=S0)
    if requires_grad:
        for x in out.values():
            x.requires_grad_(True)
    return out


def run(inp, **kw):
    return L.mom(inp["q"], inp["k"], inp["v"], inp["g"], inp["beta"], inp["weights"],
                 initial_state=inp["initial_state"], output_final_state=True, **kw)


def grads(o, S, inp):
    gen = torch.Generator().manual_seed(5)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    return dict(zip(inp, torch.autograd.grad(loss, list(inp.values()))))


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("N,chunk_size", [(1, 64), (23, 4), (40, 16), (70, 64)])
def test_chunk_equals_recurrence_with_grads(per_head, N, chunk_size):
    inp = make(N=N, per_head=per_head, seed=N, requires_grad=True)
    o1, S1 = run(inp, chunk_size=chunk_size)
    o2, S2 = run(inp, mode="recurrent")
    assert o1.shape == (2, 2, N, 3) and S1.shape == (2, 2, 4, 5, 3)
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S1, S2, rtol=1e-9, atol=1e-9)
    g1, g2 = grads(o1, S1, inp), grads(o2, S2, inp)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_against_gated_delta_rule_on_each_memorys_tokens(mode):
    """Oracle from the definition: memory m sees only its routed tokens, as one Gated DeltaNet
    sequence; the output adds w * (its read) at those tokens."""
    inp = make(B=2, H=3, M=5, N=30, top_k=2, seed=7)
    o, S = run(inp, mode=mode, chunk_size=8)
    B, H, M, N, _ = inp["k"].shape
    o_ref = torch.zeros_like(o)
    S_ref = torch.empty_like(S)
    for b in range(B):
        for m in range(M):
            pos = (inp["weights"][b, :, m] != 0).nonzero().flatten()
            S_bm = inp["initial_state"][b:b + 1, :, m]
            if len(pos):
                o_bm, S_bm = L.gated_delta_rule(inp["q"][b:b + 1, :, pos], inp["k"][b:b + 1, :, m, pos],
                                                inp["v"][b:b + 1, :, m, pos], inp["g"][b:b + 1, :, m, pos],
                                                inp["beta"][b:b + 1, :, m, pos], initial_state=S_bm,
                                                output_final_state=True, mode="recurrent")
                o_ref[b, :, pos] += inp["weights"][b, pos, m][None, :, None] * o_bm[0]
            S_ref[b, :, m] = S_bm[0]
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=1e-10, atol=1e-10)


def test_one_memory_always_routed_is_gated_delta_rule():
    inp = make(M=1, top_k=1, seed=3)
    o, S = run(inp, chunk_size=8)
    o_ref, S_ref = L.gated_delta_rule(inp["q"], inp["k"][:, :, 0], inp["v"][:, :, 0], inp["g"][:, :, 0],
                                      inp["beta"][:, :, 0], initial_state=inp["initial_state"][:, :, 0],
                                      output_final_state=True)
    w = inp["weights"][:, None, :, 0, None]
    torch.testing.assert_close(o, w * o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S[:, :, 0], S_ref, rtol=1e-10, atol=1e-10)


def test_no_token_routed_returns_zeros_and_initial_state():
    inp = make(seed=4)
    inp["weights"] = torch.zeros_like(inp["weights"])
    o, S = run(inp)
    assert torch.equal(o, torch.zeros_like(o))
    torch.testing.assert_close(S, inp["initial_state"])


@pytest.mark.parametrize("per_head", [False, True])
def test_steps_equal_full(per_head):
    inp = make(N=9, per_head=per_head, seed=8)
    o_full, S_full = run(inp, chunk_size=4)
    state, outs = inp["initial_state"], []
    for t in range(9):
        w_t = inp["weights"][..., t, :]
        o_t, state = L.mom_step(inp["q"][:, :, t], inp["k"][:, :, :, t], inp["v"][:, :, :, t], inp["g"][..., t],
                                inp["beta"][..., t], w_t, state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, S_full, rtol=1e-10, atol=1e-10)


def test_float32_against_float64():
    inp64 = make(N=100, K=16, V=16, seed=9)
    inp32 = {n: x.float() for n, x in inp64.items()}
    o, S = run(inp32, chunk_size=32)
    o_ref, S_ref = run(inp64, mode="recurrent")
    assert o.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-4)


@settings(deadline=None, max_examples=10)
@given(B=st.integers(1, 2), H=st.integers(1, 2), M=st.integers(1, 5), N=st.integers(1, 30), top=st.integers(1, 5),
       chunk_size=st.sampled_from([1, 4, 16, 64]), per_head=st.booleans(), seed=st.integers(0, 1000))
def test_property_chunk_equals_recurrence(B, H, M, N, top, chunk_size, per_head, seed):
    inp = make(B=B, H=H, M=M, N=N, K=4, V=3, top_k=min(top, M), per_head=per_head, seed=seed)
    o1, S1 = run(inp, chunk_size=chunk_size)
    o2, S2 = run(inp, mode="recurrent")
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S1, S2, rtol=1e-9, atol=1e-9)


def test_bad_inputs():
    inp = make()
    q, k, v, g, beta, w = (inp[n] for n in ("q", "k", "v", "g", "beta", "weights"))
    with pytest.raises(ValueError, match=r"k must have 5 dimensions, got shape \(2, 2, 23, 5\)"):
        L.mom(q, k[:, :, 0], v, g, beta, w)
    with pytest.raises(ValueError, match=r"v must have shape \(B, H, M, N, D_v\) with \(B, H, M, N\) = \(2, 2, 4, 23\), got \(2, 2, 3, 23, 3\)"):
        L.mom(q, k, v[:, :, :3], g, beta, w)
    with pytest.raises(ValueError, match=r"beta must have shape \(B, H, M, N\) = \(2, 2, 4, 23\), got \(2, 2, 23\)"):
        L.mom(q, k, v, g, beta[:, :, 0], w)
    with pytest.raises(ValueError, match=r"weights must have shape \(B, N, M\) = \(2, 23, 4\) or \(B, H, N, M\) = \(2, 2, 23, 4\), got \(2, 23, 3\)"):
        L.mom(q, k, v, g, beta, w[..., :3])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(B, H, M, D_k, D_v\) = \(2, 2, 4, 5, 3\)"):
        L.mom(q, k, v, g, beta, w, initial_state=torch.zeros(2, 2, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"mode must be one of"):
        L.mom(q, k, v, g, beta, w, mode="fused")
    with pytest.raises(TypeError, match=r"q must have a floating dtype .* got torch.int64"):
        L.mom(q.long(), k, v, g, beta, w)
    with pytest.raises(ValueError, match=r"w_t must have shape \(B, M\) = \(2, 4\) or \(B, H, M\) = \(2, 2, 4\), got \(2, 5\)"):
        L.mom_step(q[:, :, 0], k[:, :, :, 0], v[:, :, :, 0], g[..., 0], beta[..., 0], torch.zeros(2, 5, dtype=torch.float64))
