"""anyattn.merge combines attentions over disjoint key sets exactly, with gradients."""
import torch
from hypothesis import given
from hypothesis import strategies as st

import anyattn
from anyattn import masks
from helpers import make_qkv


@given(N_k=st.integers(2, 30), parts=st.integers(1, 4), seed=st.integers(0, 100))
def test_merge_of_key_splits_equals_full_attention(N_k, parts, seed):
    q, k, v = make_qkv(1, 2, 2, 5, N_k, 4, 3, seed=seed)
    cuts = sorted(set(torch.linspace(0, N_k, parts + 1).round().long().tolist()))
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, l = anyattn.attention(q, k[:, :, a:b], v[:, :, a:b], method="blocked", return_lse=True, scale=0.5)
        outs.append(o)
        lses.append(l)
    out, lse = anyattn.merge(outs, lses)
    want, want_lse = anyattn.attention(q, k, v, method="reference", return_lse=True, scale=0.5)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)
    g = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    gw = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v))
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_merge_empty_parts():
    q, k, v = make_qkv(1, 1, 1, 3, 4, 2, 2)
    o1, l1 = anyattn.attention(q, k, v, mask=torch.zeros(3, 4, dtype=torch.bool), method="blocked", return_lse=True)
    o2, l2 = anyattn.attention(q, k, v, method="blocked", return_lse=True)
    out, lse = anyattn.merge([o1, o2], [l1, l2])
    torch.testing.assert_close(out, o2)
    both_empty, lse_e = anyattn.merge([o1, o1], [l1, l1])
    assert torch.all(both_empty == 0) and torch.all(lse_e == float("-inf"))
    g = torch.autograd.grad(both_empty.sum(), q, allow_unused=True)[0]
    assert g is None or torch.isfinite(g).all()


def test_merge_bad_input():
    import pytest
    o = torch.zeros(1, 1, 3, 2)
    with pytest.raises(ValueError, match="as many lses as outs"):
        anyattn.merge([o], [])
    with pytest.raises(ValueError, match=r"lses\[0\] must have shape"):
        anyattn.merge([o], [torch.zeros(1, 1, 4)])


def test_causal_split_k_decoding_by_merge():
    """Split-K: a causal chunk of queries over two key halves merges to the full causal result."""
    q, k, v = make_qkv(1, 2, 1, 4, 20, 8, 8)
    o1, l1 = anyattn.attention(q, k[:, :, :10], v[:, :, :10], method="sdpa", return_lse=True)
    o2, l2 = anyattn.attention(q, k[:, :, 10:], v[:, :, 10:], mask=masks.Causal(), method="blocked", return_lse=True)
    out, _ = anyattn.merge([o1, o2], [l1, l2])
    torch.testing.assert_close(out, anyattn.attention(q, k, v, mask=masks.Causal(), method="reference"))
