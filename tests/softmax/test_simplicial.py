"""Windowed 2-simplicial attention (issue 16): the O(N w1 w2 D) engine with its hand-written backward
against the dense trilinear loop (float64, outputs and gradients of all five inputs), the oracle against
sliding-window attention where they coincide, and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anyattn
from anyattn import masks
from anyattn.softmax.simplicial import simplicial_attention, simplicial_attention_ref


def _inputs(B, H, Hk, N, D, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return r(B, H, N, D), r(B, Hk, N, D), r(B, Hk, N, D), r(B, Hk, N, Dv), r(B, Hk, N, Dv)


def _nc(x):
    """The same values stored as (B, N, H, D): a non-contiguous (B, H, N, D) view."""
    return x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * w).sum(), inputs)


@pytest.mark.parametrize("N,window,is_causal,G,chunk", [(13, (3, 5), True, 1, None), (13, (4, 2), False, 2, 3),
                                                         (9, (16, 16), True, 1, 1), (7, (1, 1), False, 1, 2)])
def test_matches_dense_loop_outputs_and_gradients(N, window, is_causal, G, chunk):
    xs = _inputs(2, 2 * G, 2, N, 5, 3)
    out = simplicial_attention(*xs, window=window, is_causal=is_causal, chunk_size=chunk)
    ref = simplicial_attention_ref(*xs, window=window, is_causal=is_causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(out, xs), _grads(ref, xs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_constant_second_pair_is_sliding_window_attention():
    # k2 = 1 makes the logits q . k1_j, independent of k; v2 = 1 makes v1 * v2 = v1: the softmax over (j, k)
    # sums its equal copies over k, leaving causal sliding-window attention over w1 keys.
    q, k1, _, v1, _ = _inputs(1, 2, 2, 12, 4, 3)
    k2, v2 = torch.ones_like(k1), torch.ones_like(v1)
    ref = anyattn.attention(q, k1, v1, mask=masks.SlidingWindow(3), method="reference")
    torch.testing.assert_close(simplicial_attention_ref(q, k1, k2, v1, v2, window=(4, 5)), ref)
    torch.testing.assert_close(simplicial_attention(q, k1, k2, v1, v2, window=(4, 5)), ref)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 12), w1=st.integers(1, 6), w2=st.integers(1, 6), D=st.integers(1, 4),
       Dv=st.integers(1, 3), G=st.integers(1, 2), is_causal=st.booleans(), chunk=st.integers(1, 7),
       contiguous=st.booleans())
def test_property_shapes(N, w1, w2, D, Dv, G, is_causal, chunk, contiguous):
    xs = _inputs(1, G, 1, N, D, Dv)
    if not contiguous:
        xs = tuple(_nc(x) for x in xs)
    out = simplicial_attention(*xs, window=(w1, w2), is_causal=is_causal, chunk_size=chunk)
    torch.testing.assert_close(out, simplicial_attention_ref(*xs, window=(w1, w2), is_causal=is_causal),
                               rtol=1e-10, atol=1e-10)


def test_float32():
    xs = _inputs(1, 2, 2, 20, 8, 8)
    out = simplicial_attention(*(x.float() for x in xs), window=(6, 6))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), simplicial_attention_ref(*xs, window=(6, 6)), rtol=2e-5, atol=2e-5)


def test_validation():
    q, k1, k2, v1, v2 = _inputs(1, 2, 2, 6, 3, 3)
    with pytest.raises(ValueError, match="window"):
        simplicial_attention(q, k1, k2, v1, v2, window=(0, 2))
    with pytest.raises(ValueError, match="window"):
        simplicial_attention(q, k1, k2, v1, v2, window=4)
    with pytest.raises(ValueError, match="k2, v2"):
        simplicial_attention(q, k1, k2[..., :2], v1, v2)
    with pytest.raises(ValueError, match="same length"):
        simplicial_attention(q, k1[:, :, :5], k2[:, :, :5], v1[:, :, :5], v2[:, :, :5])
    with pytest.raises(TypeError, match="is_causal"):
        simplicial_attention(q, k1, k2, v1, v2, is_causal="yes")
    with pytest.raises(ValueError, match="chunk_size"):
        simplicial_attention(q, k1, k2, v1, v2, chunk_size=0)
