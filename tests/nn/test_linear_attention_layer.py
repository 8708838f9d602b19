import pytest
import torch
import torch.nn.functional as F

from anyattn.nn import MIXERS, LinearAttentionLayer


def _decode(layer, x, split=None):
    """Token by token (split None) or prefill `split` tokens then token by token."""
    outs, state = [], None
    start = 0
    if split:
        y, state = layer(x[:, :split], None, use_cache=True)
        outs.append(y)
        start = split
    for t in range(start, x.shape[1]):
        y, state = layer(x[:, t:t + 1], state, use_cache=True)
        outs.append(y)
    return torch.cat(outs, 1)


def test_registered_as_mixer():
    assert MIXERS["linear_attention"] is LinearAttentionLayer


def test_matches_written_out_recurrence():
    torch.manual_seed(0)
    layer = LinearAttentionLayer(8, num_heads=2).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y, _ = layer(x)
    q, k, v = (p(x).view(2, 9, 2, 4) for p in (layer.q_proj, layer.k_proj, layer.v_proj))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    scale = 4 ** -0.5
    outs = []
    for t in range(9):
        S = torch.einsum("bshf,bshd->bhfd", fk[:, :t + 1], v[:, :t + 1])
        z = fk[:, :t + 1].sum(1)                                                    # (b, h, f)
        num = scale * torch.einsum("bhf,bhfd->bhd", fq[:, t], S)
        den = scale * torch.einsum("bhf,bhf->bh", fq[:, t], z)[..., None] + 1e-6
        outs.append(num / den)
    want = layer.o_proj(torch.stack(outs, 1).reshape(2, 9, 8))
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("opts", [{}, {"feature_map": "relu", "normalize": False},
                                  {"feature_map": "cosformer", "feature_options": {"max_len": 64}},
                                  {"mode": "recurrent"}])
def test_decoding_equals_full_forward(opts):
    torch.manual_seed(1)
    layer = LinearAttentionLayer(16, num_heads=2, **opts)
    x = torch.randn(2, 11, 16)
    y, state = layer(x, use_cache=True)
    torch.testing.assert_close(_decode(layer, x), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_decode(layer, x, split=5), y, rtol=1e-4, atol=1e-5)
    assert state["position"] == 11


def test_state_shape_and_gradients():
    layer = LinearAttentionLayer(16, num_heads=2, head_dim=4)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, state = layer(x, use_cache=True)
    assert state["recurrent"].shape == (3, 2, 4, 5)                                 # normalizer column
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in layer.parameters())
    assert layer(x)[1] is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttentionLayer(16, feature_map="softmax")
    with pytest.raises(TypeError, match="normalize"):
        LinearAttentionLayer(16, normalize=1)
    with pytest.raises(ValueError, match="hidden_size"):
        LinearAttentionLayer(0)
    layer = LinearAttentionLayer(16, num_heads=2)
    with pytest.raises(ValueError, match="hidden_size=16"):
        layer(torch.randn(2, 5, 8))
    with pytest.raises(TypeError, match="state"):
        layer(torch.randn(2, 5, 16), state=torch.zeros(1))
