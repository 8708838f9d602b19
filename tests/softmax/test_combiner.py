"""Combiner-Fixed (issue 16): `anyattn.combiner` against its dense row-stochastic matrix (float64, outputs
and gradients), the matrix itself against plain causal attention where the two coincide (one segment;
segments of one token), the decode form against the full forward, and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anyattn
from anyattn import masks
from anyattn.softmax.combiner import CombinerState, combiner, combiner_matrix, combiner_step


def _qkv(B, H, Hk, N, D, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(B, Hk, N, D, generator=g, dtype=dtype).requires_grad_(),
            torch.randn(B, Hk, N, Dv, generator=g, dtype=dtype).requires_grad_())


def _nc(x):
    """The same values stored as (B, N, H, D): a non-contiguous (B, H, N, D) view."""
    return x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


def _oracle(q, k, v, **kw):
    P = combiner_matrix(q, k, **kw)
    G = q.shape[1] // k.shape[1]
    return P @ v.repeat_interleave(G, 1), P


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("pooling", ["max", "mean"])
def test_matches_dense_matrix_outputs_and_gradients(is_causal, pooling):
    q, k, v = _qkv(2, 4, 2, 23, 6, 5)
    out = combiner(q, k, v, segment_size=5, is_causal=is_causal, pooling=pooling)
    ref, P = _oracle(q, k, v, segment_size=5, is_causal=is_causal, pooling=pooling)
    torch.testing.assert_close(P.sum(-1), torch.ones_like(P[..., 0]), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, gr in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("s", [1, 17])
def test_one_token_segments_and_one_segment_are_causal_attention(s):
    # s = 1: every earlier token is its own summary (k_bar = k_j, v_til = v_j); s = N: one local segment.
    q, k, v = _qkv(1, 2, 2, 17, 4, 3, seed=3)
    out, lse = combiner(q, k, v, segment_size=s, return_lse=True)
    ref, ref_lse = anyattn.attention(q, k, v, mask=masks.Causal(), method="reference", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    P = combiner_matrix(q, k, segment_size=s)
    torch.testing.assert_close(P @ v, ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), G=st.integers(1, 2), N=st.integers(1, 20),
       s=st.integers(1, 8), D=st.integers(1, 5), Dv=st.integers(1, 4), is_causal=st.booleans(),
       pooling=st.sampled_from(["max", "mean"]), contiguous=st.booleans())
def test_property_shapes(B, Hk, G, N, s, D, Dv, is_causal, pooling, contiguous):
    q, k, v = _qkv(B, Hk * G, Hk, N, D, Dv)
    if not contiguous:
        q, k, v = _nc(q), _nc(k), _nc(v)
    out = combiner(q, k, v, segment_size=s, is_causal=is_causal, pooling=pooling)
    ref, _ = _oracle(q, k, v, segment_size=s, is_causal=is_causal, pooling=pooling)
    assert out.shape == (B, Hk * G, N, Dv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_default_segment_and_float32():
    q, k, v = _qkv(1, 2, 1, 50, 8, 8)
    ref, _ = _oracle(q, k, v)                           # default segment round(sqrt(50)) = 7 on both sides
    out = combiner(q.float(), k.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)


@settings(max_examples=10, deadline=None)
@given(N=st.integers(1, 16), s=st.integers(1, 6), cuts=st.lists(st.integers(1, 5), min_size=1, max_size=8),
       pooling=st.sampled_from(["max", "mean"]))
def test_decode_in_chunks_equals_full_forward(N, s, cuts, pooling):
    q, k, v = _qkv(2, 2, 1, N, 3, 2, seed=5)
    full = combiner(q, k, v, segment_size=s, pooling=pooling)
    outs, state, i, j = [], None, 0, 0
    while i < N:
        c = min(cuts[j % len(cuts)], N - i)
        o, state = combiner_step(q[:, :, i:i + c], k[:, :, i:i + c], v[:, :, i:i + c], state, segment_size=s,
                                 pooling=pooling)
        outs.append(o)
        i, j = i + c, j + 1
    torch.testing.assert_close(torch.cat(outs, 2), full, rtol=1e-10, atol=1e-10)
    assert state.length == N and state.k_sum.shape[2] == N // s and state.k_cur.shape[2] == N % s


def test_decode_state_reorders():
    q, k, v = _qkv(3, 2, 2, 7, 3, 3)
    _, st_ = combiner_step(q, k, v, segment_size=3)
    idx = torch.tensor([2, 0, 1])
    o1, _ = combiner_step(q[:, :, :1] * 0 + 1, k[:, :, :1], v[:, :, :1], st_)
    st_.reorder(idx)
    o2, _ = combiner_step((q[:, :, :1] * 0 + 1)[idx], k[idx, :, :1], v[idx, :, :1], st_)
    torch.testing.assert_close(o2, o1[idx])


def test_validation():
    q, k, v = _qkv(1, 2, 2, 6, 3, 3)
    with pytest.raises(ValueError, match="same length"):
        combiner(q, k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match="segment_size"):
        combiner(q, k, v, segment_size=0)
    with pytest.raises(ValueError, match="pooling"):
        combiner(q, k, v, pooling="min")
    with pytest.raises(TypeError, match="is_causal"):
        combiner(q, k, v, is_causal=1)
    with pytest.raises(ValueError, match="segment_size on the first call"):
        combiner_step(q, k, v)
    with pytest.raises(TypeError, match="CombinerState"):
        combiner_step(q, k, v, {"k": 1})
    with pytest.raises(ValueError, match="multiple"):
        combiner(q[:, :1], k, v, segment_size=2)
    assert isinstance(combiner_step(q, k, v, segment_size=2)[1], CombinerState)


def test_blocked_route_where_sdpa_has_no_lse(monkeypatch):
    import anyattn.softmax.lse_attention as la
    q, k, v = _qkv(1, 2, 1, 11, 4, 3)
    ref, _ = _oracle(q, k, v, segment_size=3, is_causal=True)
    monkeypatch.setattr(la, "lse_supported", lambda device, dtype=None: False)
    out = combiner(q, k, v, segment_size=3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, gr in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(g, gr, rtol=1e-9, atol=1e-9)
