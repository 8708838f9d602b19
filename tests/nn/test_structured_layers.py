"""Sequence-mixer layers of issue 16 (`CombinerAttention`, `SimplicialAttention`, `TCNCALayer`): registered in
`MIXERS`, float64 outputs against compositions of the oracles, decoding in chunks equal to the full forward,
`generate` over a stack, the TCN's receptive field, and validation."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import anyattn
from anyattn.nn import MIXERS, CombinerAttention, SimplicialAttention, TCNCALayer, generate
from anyattn.softmax.combiner import combiner_matrix
from anyattn.softmax.simplicial import simplicial_attention_ref


def _layers():
    torch.manual_seed(0)
    return [CombinerAttention(16, 4, 2, segment_size=3, rotary=True).double(),
            SimplicialAttention(16, 2, window=(3, 4)).double(),
            TCNCALayer(16, num_heads=2, chunk_size=4, depth=3, dilation_factor=2).double()]


def test_registered_in_mixers():
    assert MIXERS["combiner"] is CombinerAttention and MIXERS["simplicial"] is SimplicialAttention
    assert MIXERS["tcnca"] is TCNCALayer


def test_combiner_and_simplicial_layers_against_oracles():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    comb = CombinerAttention(16, 4, 2, segment_size=3).double()
    q = comb.q_proj(x).view(2, 10, 4, 4).transpose(1, 2)
    k = comb.k_proj(x).view(2, 10, 2, 4).transpose(1, 2)
    v = comb.v_proj(x).view(2, 10, 2, 4).transpose(1, 2)
    o = combiner_matrix(q, k, segment_size=3) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(comb(x)[0], comb.o_proj(o.transpose(1, 2).reshape(2, 10, 16)))
    simp = SimplicialAttention(16, 2, window=(3, 4)).double()
    parts = [p.view(2, 10, 2, 8).transpose(1, 2) for p in simp.proj(x).chunk(5, -1)]
    o = simplicial_attention_ref(*parts, window=(3, 4))
    torch.testing.assert_close(simp(x)[0], simp.o_proj(o.transpose(1, 2).reshape(2, 10, 16)))


def test_tcnca_against_a_direct_composition():
    torch.manual_seed(2)
    layer = TCNCALayer(8, num_heads=2, zdim=4, vdim=6, chunk_size=3, kernel_size=2, depth=2, dilation_factor=3).double()
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    h = x.transpose(1, 2)
    for conv in layer.tcn:                              # residual causal dilated depthwise convolutions
        d = conv.conv.dilation[0]
        h = h + F.silu(F.conv1d(F.pad(h, ((conv.k - 1) * d, 0)), conv.conv.weight, conv.conv.bias, dilation=d, groups=8))
    xs = h.transpose(1, 2)
    z = F.silu(layer.z_proj(xs))
    q = (z * layer.gamma[0] + layer.beta[0]).view(2, 11, 2, 2).transpose(1, 2)
    k = (z * layer.gamma[1] + layer.beta[1]).view(2, 11, 2, 2).transpose(1, 2)
    v = F.silu(layer.v_proj(x)).view(2, 11, 2, 3).transpose(1, 2)
    i = torch.arange(11)
    allowed = (i[:, None] // 3 == i[None, :] // 3) & (i[None, :] <= i[:, None])
    o = anyattn.attention(q, k, v, mask=allowed, method="reference").transpose(1, 2).reshape(2, 11, 6)
    r = F.silu(layer.r_proj(xs))
    hh = F.silu(layer.h_proj(xs) + layer.u_proj(r * o))
    phi = torch.sigmoid(layer.phi_proj(xs))
    torch.testing.assert_close(layer(x)[0], phi * hh + (1 - phi) * x)


def test_tcn_receptive_field():
    layer = TCNCALayer(4, chunk_size=4, kernel_size=3, depth=3, dilation_factor=2)
    assert layer.receptive_field == 1 + 2 * (1 + 2 + 4)
    x = torch.randn(1, 40, 4, requires_grad=True)
    xs, _ = layer._tcn(x, [None] * 3)
    g = torch.autograd.grad(xs[0, 30].sum(), x)[0][0].abs().sum(-1)
    support = torch.nonzero(g).flatten()
    assert int(support.min()) == 30 - (layer.receptive_field - 1) and int(support.max()) == 30


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6), which=st.integers(0, 2))
def test_decoding_in_chunks_equals_full_forward(cuts, which):
    layer = _layers()[which]
    x = torch.randn(2, 13, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(len(cuts)))
    full, _ = layer(x)
    outs, state, i, j = [], None, 0, 0
    while i < 13:
        c = min(cuts[j % len(cuts)], 13 - i)
        y, state = layer(x[:, i:i + c], state, use_cache=True)
        outs.append(y)
        i, j = i + c, j + 1
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_generate_over_a_stack_and_reorder():
    stack = _layers()
    prompt = torch.randn(3, 6, 16, dtype=torch.float64)
    out, states = generate(stack, prompt, 4, return_prompt_output=True)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            y = seq
            for layer in stack:
                y, _ = layer(y)
            seq = torch.cat([prompt, y[:, prompt.shape[1] - 1:]], 1)
        y = seq
        for layer in stack:
            y, _ = layer(y)
    torch.testing.assert_close(out, y, rtol=1e-9, atol=1e-9)
    anyattn.nn.reorder_states(states, torch.tensor([2, 0, 1]))


def test_float32_layers_and_validation():
    for layer in _layers():
        layer = layer.float()
        y, _ = layer(torch.randn(1, 5, 16))
        assert y.dtype == torch.float32 and y.shape == (1, 5, 16)
        with pytest.raises(ValueError, match="dim=16"):
            layer(torch.randn(1, 5, 8))
        with pytest.raises(TypeError, match="state"):
            layer(torch.randn(1, 5, 16), state=3)
    with pytest.raises(ValueError, match="causal"):
        CombinerAttention(16, 4, causal=False)(torch.randn(1, 4, 16), use_cache=True)
    with pytest.raises(ValueError, match="pooling"):
        CombinerAttention(16, 4, pooling="sum")
    with pytest.raises(ValueError, match="divisible"):
        TCNCALayer(16, num_heads=3, zdim=8)
    assert TCNCALayer(16, num_heads=3).zdim % 3 == 0
    with pytest.raises(ValueError, match="window"):
        SimplicialAttention(16, 2, window=8)
    assert math.isfinite(TCNCALayer(16).receptive_field)
