"""Property-based: chunk == recurrence (float64) over drawn shapes, chunk sizes, grouped-query
ratios and methods."""
import torch
from hypothesis import given, settings, strategies as st

from _linear_cases import METHODS, call, make_inputs


@settings(deadline=None, max_examples=12)
@given(method=st.sampled_from(sorted(METHODS)), B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40),
       K=st.integers(1, 9), V=st.integers(1, 7), chunk_size=st.sampled_from([1, 3, 4, 8, 16, 64]),
       with_state=st.booleans(), groups=st.sampled_from([1, 1, 2, 3]), seed=st.integers(0, 1000))
def test_chunk_equals_recurrence(method, B, H, N, K, V, chunk_size, with_state, groups, seed):
    inp = make_inputs(method, B=B, H=H, N=N, K=K, V=V, seed=seed, initial_state=with_state, groups=groups)
    o1, S1 = call(method, inp, chunk_size=chunk_size, output_final_state=True)
    o2, S2 = call(method, inp, mode="recurrent", output_final_state=True)
    assert o1.shape == (B, H * groups, N, V) and S1.shape == (B, H, K, V)
    torch.testing.assert_close(o1, o2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(S1, S2, rtol=1e-9, atol=1e-9)


@settings(deadline=None, max_examples=8)
@given(method=st.sampled_from(sorted(METHODS)), N=st.integers(2, 30), split=st.integers(1, 29),
       chunk_size=st.sampled_from([4, 16, 64]), seed=st.integers(0, 1000))
def test_state_carries_across_calls(method, N, split, chunk_size, seed):
    """Running [0, s) then [s, N) with the returned state equals one call over [0, N)."""
    split = min(split, N - 1)
    inp = make_inputs(method, N=N, seed=seed)
    o, S = call(method, inp, chunk_size=chunk_size, output_final_state=True)
    gkind = METHODS[method][2]

    def part(sl, S0):
        p = dict(inp)
        for n in ("q", "k", "v", "beta"):
            if p[n] is not None:
                p[n] = p[n][:, :, sl]
        if gkind in ("token", "vector"):
            p["g"] = p["g"][:, :, sl]
        p["initial_state"] = S0
        return call(method, p, chunk_size=chunk_size, output_final_state=True)

    oa, Sa = part(slice(0, split), inp["initial_state"])
    ob, Sb = part(slice(split, N), Sa)
    torch.testing.assert_close(torch.cat([oa, ob], 2), o, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(Sb, S, rtol=1e-9, atol=1e-9)
