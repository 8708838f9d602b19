"""Grouped-query heads: q has G * H heads, k, v, gates and the state H. Every method must equal the
multi-head call with k, v, g, beta and initial_state repeated for each query head of a group, in
outputs, final states (one per key/value head) and the gradients of every input; in both modes and
for the one-token steps."""
import pytest
import torch

from _linear_cases import METHODS, call, make_inputs, step_inputs
from anyattn import linear as L

G = 3


def _repeat(method, inp):
    """The multi-head equivalent: every key-side input repeated G times along the head dim."""
    gkind = METHODS[method][2]
    out = dict(inp)
    for name in ("k", "v", "beta", "initial_state"):
        if inp[name] is not None:
            out[name] = inp[name].repeat_interleave(G, 1)
    if inp["g"] is not None:
        out["g"] = inp["g"].repeat_interleave(G, 0 if gkind in ("head", "slopes") else 1)
    return out


def _loss_grads(o, S, inp, seed=0):
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    names = [n for n, x in inp.items() if x is not None]
    return dict(zip(names, torch.autograd.grad(loss, [inp[n] for n in names])))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("mode,chunk_size", [("chunk", 4), ("chunk", 64), ("recurrent", 64)])
def test_gqa_equals_repeated_kv(method, mode, chunk_size):
    inp = make_inputs(method, B=2, H=2, N=11, K=5, V=4, groups=G, seed=11, requires_grad=True)
    o, S = call(method, inp, mode=mode, chunk_size=chunk_size, output_final_state=True)
    assert o.shape == (2, 2 * G, 11, 4) and S.shape == (2, 2, 5, 4)
    rep = _repeat(method, inp)
    o_ref, S_ref = call(method, rep, mode="recurrent", output_final_state=True)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(S, S_ref[:, ::G], rtol=1e-10, atol=1e-10)
    # the gradient of a shared key-side input sums over its query group
    S_w = S_ref[:, ::G]
    g1 = _loss_grads(o, S, inp)
    g2 = _loss_grads(o_ref, S_w, inp)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-9, msg=f"grad of {name}")


@pytest.mark.parametrize("method", list(METHODS))
def test_gqa_steps_equal_full(method):
    inp = make_inputs(method, N=6, groups=G, seed=12)
    o_full, S_full = call(method, inp, output_final_state=True, chunk_size=4)
    step = METHODS[method][1]
    state, outs = inp["initial_state"], []
    for t in range(6):
        o_t, state = step(*step_inputs(method, inp, t), state)
        outs.append(o_t)
    torch.testing.assert_close(torch.stack(outs, 2), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, S_full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("feature_map", ["elu1", "performer", "nalaformer"])
@pytest.mark.parametrize("causal,normalize", [(True, True), (False, False), (False, True)])
def test_gqa_linear_attention_feature_maps(feature_map, causal, normalize):
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(1, 4, 9, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 9, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 5, generator=gen, dtype=torch.float64)
    kw = dict(feature_map=feature_map, causal=causal, normalize=normalize)
    if feature_map == "performer":
        kw["feature_options"] = {"seed": 3}
    o = L.linear_attention(q, k, v, **kw)
    o_ref = L.linear_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10)
