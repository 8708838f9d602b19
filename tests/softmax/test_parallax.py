"""Parallax attention: blocked pass against the dense formula in float64 (outputs and gradients of q, k, v, r)
under every kind of mask, grouped-query heads, N_q != N_k, empty rows, small tiles; float32; bad inputs."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
from anyattn import masks

B, H = 2, 4


def make(Hkv=2, Nq=37, Nk=37, D=8, Dv=5, seed=0, dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64), torch.randn(B, Hkv, Nk, D, generator=g, dtype=torch.float64),
          torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=torch.float64), 0.3 * torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)]
    return [x.to(dtype).requires_grad_(requires_grad) for x in xs]


def dense(q, k, v, r, allowed, scale):
    """o_i = sum_j s_ij [1 - r_i . (k_j - μ̄_i)] v_j with s the masked softmax (0 for empty rows)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    mu = p @ k
    w = p * (1 - r @ k.transpose(-1, -2) + (r * mu).sum(-1, keepdim=True))
    return w @ v


MASKS = {
    "none": lambda Nq, Nk: None,
    "causal": lambda Nq, Nk: masks.Causal(),
    "window": lambda Nq, Nk: masks.SlidingWindow(9, 2),
    "padding": lambda Nq, Nk: masks.KeyPadding(torch.tensor([Nk, Nk // 3])),
    "document": lambda Nq, Nk: masks.Document(torch.arange(Nq).div(11, rounding_mode="floor").expand(B, Nq)),
    "mask_mod": lambda Nq, Nk: masks.MaskMod(lambda b, h, qi, kj: (qi + kj) % 3 != 0),
    "causal_and_padding": lambda Nq, Nk: masks.Causal() & masks.KeyPadding(torch.tensor([Nk - 5, 4])),
    "empty_rows": lambda Nq, Nk: masks.Causal() & masks.SlidingWindow(0) & masks.KeyPadding(torch.tensor([Nk, 10])),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_against_dense_with_grads(name):
    q, k, v, r = make(seed=len(name))
    spec = MASKS[name](37, 37)
    out = anyattn.parallax_attention(q, k, v, r, mask=spec, block_q=8, block_k=16)
    allowed = torch.ones(1, 1, 37, 37, dtype=torch.bool) if spec is None else spec.dense(B, H, 37, 37, q.device)
    want = dense(q, k, v, r, allowed, 8 ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out * g).sum(), (q, k, v, r))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v, r))
    for a, b_, n in zip(got, ref, "qkvr"):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{n}: {m}")


def test_r_zero_is_softmax_attention():
    q, k, v, r = make(requires_grad=False)
    out = anyattn.parallax_attention(q, k, v, torch.zeros_like(r), mask=masks.Causal())
    torch.testing.assert_close(out, anyattn.attention(q, k, v, mask=masks.Causal(), method="reference"), rtol=1e-12, atol=1e-12)


@settings(deadline=None, max_examples=12)
@given(Hkv=st.sampled_from([1, 2, 4]), Nq=st.integers(1, 40), Nk=st.integers(1, 40), D=st.integers(1, 9),
       Dv=st.integers(1, 6), causal=st.booleans(), bq=st.sampled_from([1, 4, 16, 256]), bk=st.sampled_from([3, 8, 512]),
       seed=st.integers(0, 999))
def test_over_shapes(Hkv, Nq, Nk, D, Dv, causal, bq, bk, seed):
    q, k, v, r = make(Hkv, Nq, Nk, D, Dv, seed)
    spec = masks.Causal() if causal else None
    out = anyattn.parallax_attention(q, k, v, r, mask=spec, block_q=bq, block_k=bk)
    allowed = spec.dense(B, H, Nq, Nk, q.device) if causal else torch.ones(1, 1, Nq, Nk, dtype=torch.bool)
    want = dense(q, k, v, r, allowed, D ** -0.5)
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-9)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2))
    for a, b_ in zip(torch.autograd.grad((out * g).sum(), (q, k, r)), torch.autograd.grad((want * g).sum(), (q, k, r))):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8)


def test_float32_and_bf16():
    q, k, v, r = make(Nq=200, Nk=200, D=16, Dv=16, requires_grad=False)
    want = dense(q, k, v, r, masks.Causal().dense(B, H, 200, 200, q.device), 0.25)
    out32 = anyattn.parallax_attention(*(x.float() for x in (q, k, v, r)), mask=masks.Causal())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), want, rtol=2e-5, atol=2e-5)
    out16 = anyattn.parallax_attention(*(x.bfloat16() for x in (q, k, v, r)), mask=masks.Causal())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.double(), want, rtol=5e-2, atol=5e-2)


def test_bad_inputs():
    q, k, v, r = make(requires_grad=False)
    with pytest.raises(ValueError, match=r"r must have q's shape \(B, H, N_q, D\) = \(2, 4, 37, 8\), got \(2, 4, 36, 8\)"):
        anyattn.parallax_attention(q, k, v, r[:, :, :36])
    with pytest.raises(ValueError, match="r must have q's dtype"):
        anyattn.parallax_attention(q, k, v, r.float())
    with pytest.raises(ValueError, match="k must have q's head dim"):
        anyattn.parallax_attention(q, k[..., :4], v, r)
    with pytest.raises(TypeError, match="mask must be None"):
        anyattn.parallax_attention(q, k, v, r, mask=3)
