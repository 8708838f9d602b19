"""Chunk engines against the float64 step-by-step recurrence (the oracle): outputs, final states and
gradients of every input, several chunk sizes and odd lengths; `*_step` repeated N times."""
import pytest
import torch

from _linear_cases import METHODS, call, make_inputs, step_inputs

ALL = list(METHODS)


def _grads(method, inp, mode, chunk_size=64, seed=1):
    o, S = call(method, inp, mode=mode, chunk_size=chunk_size, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    wo = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S.dtype)
    loss = (o * wo).sum() + (S * ws).sum()
    names = [n for n, x in inp.items() if x is not None]
    grads = torch.autograd.grad(loss, [inp[n] for n in names])
    return o, S, dict(zip(names, grads))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("N,chunk_size", [(1, 64), (7, 4), (65, 16), (130, 64), (33, 8)])
def test_float64_outputs_states_grads(method, N, chunk_size):
    inp = make_inputs(method, N=N, requires_grad=True, seed=N)
    o1, S1, g1 = _grads(method, inp, "chunk", chunk_size)
    o2, S2, g2 = _grads(method, inp, "recurrent")
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S1, S2, rtol=1e-9, atol=1e-9)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("method", ALL)
def test_float32_against_float64_oracle(method):
    inp64 = make_inputs(method, N=100, K=16, V=16, seed=3)
    inp32 = {n: (None if x is None else x.float()) for n, x in inp64.items()}
    o_ref, S_ref = call(method, inp64, mode="recurrent", output_final_state=True)
    o, S = call(method, inp32, mode="chunk", chunk_size=32, output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ALL)
def test_float32_gradients(method):
    inp64 = make_inputs(method, N=40, seed=4, requires_grad=True)
    inp32 = {n: (None if x is None else x.detach().float().requires_grad_()) for n, x in inp64.items()}
    _, _, g_ref = _grads(method, inp64, "recurrent")
    _, _, g = _grads(method, inp32, "chunk", 16)
    for name in g_ref:
        torch.testing.assert_close(g[name].double(), g_ref[name], rtol=1e-4, atol=1e-4, msg=f"grad of {name}")


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("N", [1, 9])
def test_step_equals_full(method, N):
    inp = make_inputs(method, N=N, seed=5)
    o_full, S_full = call(method, inp, output_final_state=True, chunk_size=4)
    step = METHODS[method][1]
    state = inp["initial_state"]
    outs = []
    for t in range(N):
        o_t, state = step(*step_inputs(method, inp, t), state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, S_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["retention", "gla", "gated_delta_rule", "kda"])
def test_step_state_none_is_zero_state(method):
    inp = make_inputs(method, N=3, initial_state=False)
    step = METHODS[method][1]
    o_a, S_a = step(*step_inputs(method, inp, 0), None)
    zero = torch.zeros(2, 2, 8, 6, dtype=torch.float64)
    o_b, S_b = step(*step_inputs(method, inp, 0), zero)
    torch.testing.assert_close(o_a, o_b)
    torch.testing.assert_close(S_a, S_b)


@pytest.mark.parametrize("method", ["retention", "gla", "gated_delta_rule", "kda"])
def test_strong_decay_is_finite(method):
    # log-decays down to about -5 per step (and beyond) in fp32: no inf / NaN in outputs, states, grads.
    inp = make_inputs(method, N=150, K=16, V=16, dtype=torch.float32, strength=5.0, seed=6, requires_grad=True)
    with torch.no_grad():
        if inp["g"] is not None and METHODS[method][2] in ("token", "vector"):
            inp["g"].mul_(2.0)  # down to ~ -10 per step on some tokens
    o, S, grads = _grads(method, inp, "chunk", 64)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    for name, gr in grads.items():
        assert torch.isfinite(gr).all(), name
    inp64 = {n: (None if x is None else x.detach().double()) for n, x in inp.items()}
    o_ref, S_ref = call(method, inp64, mode="recurrent", output_final_state=True)
    torch.testing.assert_close(o.detach().double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S.detach().double(), S_ref, rtol=1e-4, atol=1e-4)


def test_float64_extreme_decay_no_overflow():
    # -30 per step for 64 steps: exp(+1920) would overflow even fp64 if computed naively.
    inp = make_inputs("kda", N=64, dtype=torch.float64, seed=7)
    inp["g"] = inp["g"] * 0 - 30.0
    o, S = call("kda", inp, output_final_state=True)
    o_ref, S_ref = call("kda", inp, mode="recurrent", output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S, S_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["gla", "kda"])
def test_low_precision_accumulates_in_fp32(method, dtype):
    inp = make_inputs(method, N=70, K=16, V=16, dtype=dtype, seed=8)
    o, S = call(method, inp, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    ref_inp = {n: (None if x is None else x.double()) for n, x in inp.items()}
    o_ref, _ = call(method, ref_inp, mode="recurrent", output_final_state=True)
    torch.testing.assert_close(o.double(), o_ref, rtol=2e-2, atol=2e-2)


def test_output_final_state_false_returns_tensor():
    inp = make_inputs("gla", N=5)
    out = call("gla", inp)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, 5, 6)


def test_lightning_is_retention_with_negative_slopes():
    from anyattn import linear as L
    inp = make_inputs("lightning", N=20)
    slopes = inp["g"]
    a = L.lightning(inp["q"], inp["k"], inp["v"], slopes)
    b = L.retention(inp["q"], inp["k"], inp["v"], -slopes)
    torch.testing.assert_close(a, b)
    d = L.lightning(inp["q"], inp["k"], inp["v"])  # default ALiBi slopes
    e = L.retention(inp["q"], inp["k"], inp["v"], -L.alibi_slopes(2).double())
    torch.testing.assert_close(d, e)


def test_alibi_slopes():
    from anyattn.linear import alibi_slopes
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert alibi_slopes(6).shape == (6,) and (alibi_slopes(6) > 0).all()


def test_scale_argument():
    inp = make_inputs("kda", N=10)
    a = call("kda", inp, scale=0.3)
    b = call("kda", inp, scale=0.3, mode="recurrent")
    torch.testing.assert_close(a, b)
    c = call("kda", inp)
    d = call("kda", inp, scale=8 ** -0.5)
    torch.testing.assert_close(c, d)


def test_noncontiguous_inputs():
    inp = make_inputs("gated_delta_rule", N=12)
    t = {n: (None if x is None else x.transpose(-1, -2).contiguous().transpose(-1, -2)) for n, x in inp.items()}
    t["q"] = inp["q"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not t["q"].is_contiguous()
    torch.testing.assert_close(call("gated_delta_rule", t), call("gated_delta_rule", inp))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("groups", [1, 2])
def test_many_chunk_groups(method, groups, monkeypatch):
    """The engines walk the sequence in groups of chunks (state carried from group to group); make the
    groups small so every case crosses several group boundaries, with a partial last group."""
    from anyattn.linear import chunk_decay, chunk_delta
    monkeypatch.setattr(chunk_delta, "GROUP_TOKENS", 8)
    monkeypatch.setattr(chunk_decay, "DECAY_GROUP_TOKENS", 12)
    inp = make_inputs(method, N=45, groups=groups, requires_grad=True, seed=21)
    o1, S1, g1 = _grads(method, inp, "chunk", 4)
    o2, S2, g2 = _grads(method, inp, "recurrent")
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S1, S2, rtol=1e-9, atol=1e-9)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")
