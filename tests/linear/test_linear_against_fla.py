"""Against flash-linear-attention's pure-PyTorch references (fla-core; layout (B, T, H, D)).
Skipped when fla-core (or einops) is not installed."""
import pytest
import torch

from anyattn import linear as L
from anyattn.linear.fla_reference import available, load_naive
from _linear_cases import make_inputs

ok, why = available()
pytestmark = pytest.mark.skipif(not ok, reason=f"fla-core references unavailable: {why}")


def bt(x):
    return x.transpose(1, 2).contiguous()


def _f32(method, N=64, **kw):
    inp = make_inputs(method, N=N, K=16, V=16, dtype=torch.float32, seed=11, **kw)
    return {n: (None if x is None else x.float()) for n, x in inp.items()}


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N", [64, 50])
def test_gated_delta_rule(N):
    m = load_naive("gated_delta_rule")
    i = _f32("gated_delta_rule", N)
    o, S = L.gated_delta_rule(i["q"], i["k"], i["v"], i["g"], i["beta"], initial_state=i["initial_state"],
                              output_final_state=True)
    o_r, S_r = m.naive_recurrent_gated_delta_rule(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["beta"]), bt(i["g"]),
                                                  initial_state=i["initial_state"], output_final_state=True)
    _close(o, bt(o_r)), _close(S, S_r)
    o_c, S_c = m.naive_chunk_gated_delta_rule(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["g"]), bt(i["beta"]),
                                              chunk_size=16, initial_state=i["initial_state"], output_final_state=True)
    _close(o, bt(o_c)), _close(S, S_c)


def test_kda():
    m = load_naive("kda")
    i = _f32("kda", 64)
    o, S = L.kda(i["q"], i["k"], i["v"], i["g"], i["beta"], initial_state=i["initial_state"], output_final_state=True)
    o_r, S_r = m.naive_recurrent_kda(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["g"]), bt(i["beta"]),
                                     initial_state=i["initial_state"], output_final_state=True)
    _close(o, bt(o_r)), _close(S, S_r)
    o_c, S_c = m.naive_chunk_kda(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["g"]), bt(i["beta"]),
                                 initial_state=i["initial_state"], output_final_state=True, chunk_size=16)
    _close(o, bt(o_c)), _close(S, S_c)


def test_gla():
    m = load_naive("gla")
    i = _f32("gla", 37)
    o, S = L.gla(i["q"], i["k"], i["v"], i["g"], initial_state=i["initial_state"], output_final_state=True)
    o_r, S_r = m.naive_recurrent_gla(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["g"]),
                                     initial_state=i["initial_state"], output_final_state=True)
    _close(o, bt(o_r)), _close(S, S_r)


def test_retention_is_simple_gla():
    m = load_naive("simple_gla")
    i = _f32("retention", 45)
    o, S = L.retention(i["q"], i["k"], i["v"], i["g"], initial_state=i["initial_state"], output_final_state=True)
    o_r, S_r = m.naive_recurrent_simple_gla(bt(i["q"]), bt(i["k"]), bt(i["v"]), bt(i["g"]),
                                            initial_state=i["initial_state"], output_final_state=True)
    _close(o, bt(o_r)), _close(S, S_r)


def test_delta_rule():
    m = load_naive("delta_rule")
    i = _f32("delta_rule", 40)
    o, S = L.delta_rule(i["q"], i["k"], i["v"], i["beta"], initial_state=i["initial_state"], output_final_state=True)
    o_r, S_r = m.delta_rule_recurrence(i["q"], i["k"], i["v"], i["beta"], initial_state=i["initial_state"].clone(),
                                       output_final_state=True)
    _close(o, o_r), _close(S, S_r)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attention(normalize):
    m = load_naive("linear_attn")
    i = _f32("linear", 30, initial_state=False)
    o, S = L.linear_attention(i["q"], i["k"], i["v"], feature_map=None, normalize=normalize, output_final_state=True,
                              eps=1e-10)
    o_r, st = m.naive_recurrent_linear_attn(bt(i["q"]), bt(i["k"]), bt(i["v"]), output_final_state=True,
                                            normalize=normalize)
    _close(o, bt(o_r))
    _close(S[..., :16], st[0] if normalize else st)
