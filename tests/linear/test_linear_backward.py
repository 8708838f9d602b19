"""The chunk engines' hand-written backward passes against the autograd path they replaced (the previous
engines differentiated by autograd) and against the float64 token loop: outputs, final states and the
gradients of every input (q, k, v, g, beta, initial state), with cotangents on the output, the final state
or both; across chunk-group boundaries (group sizes shrunk), grouped-query heads and odd lengths. Then the
bf16 / fp16 paths against float64 with their documented bounds."""
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn import linear as L
from anyattn.backward_switch import autograd_backward
from anyattn.linear import chunk_decay, chunk_delta
from _linear_cases import METHODS, call, make_inputs, step_inputs

ALL = list(METHODS)


def _run(method, inp, mode, chunk_size, cot, autograd=False):
    """(o, S, grads of <o, w_o> + <S, w_S> w.r.t. every input that requires grad)."""
    with autograd_backward(autograd):
        o, S = call(method, inp, mode=mode, chunk_size=chunk_size, output_final_state=True)
    wo, ws = cot
    loss = (o * wo.to(o.dtype)).sum() + (S * ws.to(S.dtype)).sum()
    names = [n for n, x in inp.items() if x is not None and x.requires_grad]
    return o, S, dict(zip(names, torch.autograd.grad(loss, [inp[n] for n in names])))


def _cotangents(inp, method, which, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq, N, V = inp["q"].shape[1], inp["q"].shape[2], inp["v"].shape[-1]
    B, H, K = inp["k"].shape[0], inp["k"].shape[1], inp["k"].shape[-1]
    K_state = K
    wo = torch.randn(B, Hq, N, V, generator=gen, dtype=torch.float64) * (which != "state")
    ws = torch.randn(B, H, K_state, V, generator=gen, dtype=torch.float64) * (which != "output")
    return wo, ws


def _close(a, b, what, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@settings(max_examples=30, deadline=None)
@given(method=st.sampled_from(ALL), N=st.integers(1, 40), chunk_size=st.sampled_from([4, 8, 12, 16, 64]),
       groups=st.sampled_from([1, 2]), initial=st.booleans(), KV=st.sampled_from([(8, 6), (4, 8)]),
       which=st.sampled_from(["both", "output", "state"]), small_groups=st.booleans(), seed=st.integers(0, 99))
def test_handwritten_backward_matches_autograd_and_oracle(method, N, chunk_size, groups, initial, KV, which,
                                                          small_groups, seed):
    K, V = KV
    inp = make_inputs(method, B=1, H=2, N=N, K=K, V=V, groups=groups, initial_state=initial, requires_grad=True,
                      seed=seed)
    cot = _cotangents(inp, method, which, seed)
    sizes = (8, 12) if small_groups else (chunk_delta.GROUP_TOKENS, chunk_decay.DECAY_GROUP_TOKENS)
    with mock.patch.object(chunk_delta, "GROUP_TOKENS", sizes[0]), \
            mock.patch.object(chunk_decay, "DECAY_GROUP_TOKENS", sizes[1]):
        o1, S1, g1 = _run(method, inp, "chunk", chunk_size, cot)
        o2, S2, g2 = _run(method, inp, "chunk", chunk_size, cot, autograd=True)
    o3, S3, g3 = _run(method, inp, "recurrent", chunk_size, cot)
    _close(o1, o3, "output")
    _close(S1, S3, "final state")
    assert g1.keys() == g2.keys() == g3.keys()
    for name in g1:
        _close(g1[name], g2[name], f"grad of {name} vs autograd")
        _close(g1[name], g3[name], f"grad of {name} vs the token loop")


@pytest.mark.parametrize("method", ["gla", "gated_delta_rule", "kda", "retention", "linear", "delta_rule"])
@pytest.mark.parametrize("only", ["v", "initial_state", "g"])
def test_gradients_of_a_subset_of_inputs(method, only):
    """Only some inputs require grad: the others get none, the requested ones match the token loop."""
    inp = make_inputs(method, B=2, H=2, N=23, seed=3)
    if inp.get(only) is None:
        pytest.skip(f"{method} has no {only}")
    inp[only] = inp[only].clone().requires_grad_()
    cot = _cotangents(inp, method, "both", 4)
    _, _, g1 = _run(method, inp, "chunk", 8, cot)
    _, _, g2 = _run(method, inp, "recurrent", 8, cot)
    assert list(g1) == [only]
    _close(g1[only], g2[only], f"grad of {only}")


def test_expanded_and_noncontiguous_inputs():
    """Retention's per-head g is expanded over (B, N); q given transposed: gradients still match."""
    inp = make_inputs("retention_head", N=30, seed=5)
    q = inp["q"].transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
    g = inp["g"].clone().requires_grad_()
    outs = []
    for ag in (False, True):
        with autograd_backward(ag):
            o = L.retention(q, inp["k"], inp["v"], g, chunk_size=8)
        outs.append(torch.autograd.grad((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum(),
                                        (q, g)))
    for a, b in zip(*outs):
        _close(a, b, "retention grads")


def test_mom_gradients_through_the_delta_engine():
    """MoM runs the delta engine once per memory: its gradients match the autograd path."""
    gen = torch.Generator().manual_seed(0)
    B, H, M, N, K, V = 1, 2, 3, 20, 8, 6
    q = F.normalize(torch.randn(B, H, N, K, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, H, M, N, K, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    v = torch.randn(B, H, M, N, V, generator=gen, dtype=torch.float64).requires_grad_()
    g = F.logsigmoid(torch.randn(B, H, M, N, generator=gen, dtype=torch.float64) + 2).requires_grad_()
    beta = torch.rand(B, H, M, N, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.rand(B, N, M, generator=gen, dtype=torch.float64) * (torch.rand(B, N, M, generator=gen) > 0.4)
    res = []
    for ag in (False, True):
        with autograd_backward(ag):
            o = L.mom(q, k, v, g, beta, w, chunk_size=8)
        res.append(torch.autograd.grad((o * o).sum(), (q, k, v, g, beta)))
    for name, a, b in zip("qkvgb", *res):
        _close(a, b, f"mom grad of {name}")


# ------------------------------------------------------------------------------------------ bf16 / fp16

# Documented bounds (docs/linear.md): relative Frobenius error against float64 of the output and of every
# gradient, for inputs rounded to the low precision (so only the computation's error is measured).
LOW_PRECISION_BOUND = 1e-2   # measured worst (N in {150, 600}, 4 seeds): 7.4e-3
GATE_GRAD_BOUND = 3e-2       # dg: a sum over channels of differences of bf16 products; measured worst 2.1e-2


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["gated_delta_rule", "kda", "gla", "retention", "delta_rule", "linear"])
def test_low_precision_error_bound(method, dtype):
    inp = make_inputs(method, B=1, H=2, N=150, K=32, V=32, dtype=dtype, seed=7, requires_grad=True)
    ref = {n: (None if x is None else x.detach().double().requires_grad_()) for n, x in inp.items()}
    cot = _cotangents(inp, method, "both", 8)
    o, S, g = _run(method, inp, "chunk", 64, cot)
    o_ref, S_ref, g_ref = _run(method, ref, "recurrent", 64, cot)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert _rel(o, o_ref) <= LOW_PRECISION_BOUND and _rel(S, S_ref) <= LOW_PRECISION_BOUND
    for name in g:
        assert g[name].dtype == inp[name].dtype, name
        bound = GATE_GRAD_BOUND if name == "g" else LOW_PRECISION_BOUND
        assert _rel(g[name], g_ref[name]) <= bound, (name, _rel(g[name], g_ref[name]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["gated_delta_rule", "kda", "gla", "retention", "linear"])
def test_low_precision_steps(method, dtype):
    """`*_step` with bf16 / fp16 tokens: output in the input dtype, state in fp32, within the bound of float64."""
    inp = make_inputs(method, B=2, H=2, N=12, dtype=dtype, seed=9)
    step = METHODS[method][1]
    ref = {n: (None if x is None else x.double()) for n, x in inp.items()}
    S, S_ref = inp["initial_state"], ref["initial_state"]
    for t in range(12):
        o, S = step(*step_inputs(method, inp, t), S)
        o_ref, S_ref = step(*step_inputs(method, ref, t), S_ref)
        assert o.dtype == dtype and S.dtype == torch.float32
        assert _rel(o, o_ref) <= LOW_PRECISION_BOUND
    assert _rel(S, S_ref) <= LOW_PRECISION_BOUND
