"""anyattn.nn linear-family layers: token-by-token decoding equals the full-sequence forward."""
import pytest
import torch

from anyattn.nn.linear_layers import LINEAR_LAYERS, GatedDeltaNetLayer, GLALayer, KDALayer, MoMLayer

CONFIGS = [
    ("gla", {}),
    ("gla", {"use_short_conv": True}),
    ("gated_deltanet", {}),
    ("gated_deltanet", {"use_gate": False}),
    ("kda", {}),
    ("kda", {"mode": "recurrent"}),
    ("gla", {"num_kv_heads": 1}),
    ("gated_deltanet", {"num_kv_heads": 1}),
    ("kda", {"num_kv_heads": 1}),
    ("mom", {}),
    ("mom", {"shared_memory": False, "top_k": 1, "mode": "recurrent"}),
]


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_decode_equals_full(name, kw):
    torch.manual_seed(0)
    layer = LINEAR_LAYERS[name](32, num_heads=2, head_dim=8, chunk_size=8, **kw).double()
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    y_full, st_full = layer(x, use_cache=True)
    assert y_full.shape == x.shape
    state, ys = None, []
    for t in range(x.shape[1]):
        y_t, state = layer(x[:, t:t + 1], state=state, use_cache=True)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(state["recurrent"], st_full["recurrent"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(LINEAR_LAYERS))
def test_prefill_then_decode(name):
    torch.manual_seed(1)
    layer = LINEAR_LAYERS[name](24, num_heads=3, head_dim=4, chunk_size=4).double()
    x = torch.randn(1, 11, 24, dtype=torch.float64)
    y_full, _ = layer(x)
    y_a, st = layer(x[:, :7], use_cache=True)
    y_b, st = layer(x[:, 7:9], state=st, use_cache=True)
    y_c, _ = layer(x[:, 9:], state=st, use_cache=True)
    torch.testing.assert_close(torch.cat([y_a, y_b, y_c], 1), y_full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(LINEAR_LAYERS))
def test_backward_and_state_none_without_cache(name):
    layer = LINEAR_LAYERS[name](16, num_heads=2, head_dim=8)
    x = torch.randn(2, 70, 16, requires_grad=True)
    y, st = layer(x)
    assert st is None
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters() if p.requires_grad)


def test_delta_layers_normalize_qk_and_shapes():
    layer = GatedDeltaNetLayer(32, num_heads=2, head_dim=8)
    assert layer.head_v_dim == 16  # published expand_v = 2
    _, st = layer(torch.randn(1, 5, 32), use_cache=True)
    assert st["recurrent"].shape == (1, 2, 8, 16) and st["recurrent"].dtype == torch.float32
    assert [c.shape for c in st["conv"]] == [(1, 3, 16), (1, 3, 16), (1, 3, 32)]
    assert KDALayer(32, 4).head_dim == 8 and GLALayer(32, 4).head_dim == 4


@pytest.mark.parametrize("name", ["gla", "gated_deltanet", "kda"])
def test_grouped_kv_heads_shapes_and_modes(name):
    torch.manual_seed(2)
    layer = LINEAR_LAYERS[name](32, num_heads=4, head_dim=8, num_kv_heads=2, chunk_size=8).double()
    assert layer.k_proj.out_features == 2 * 8 and layer.q_proj.out_features == 4 * 8
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    y, st = layer(x, use_cache=True)
    assert y.shape == x.shape and st["recurrent"].shape == (2, 2, 8, layer.head_v_dim)
    layer.mode = "recurrent"
    y_rec, st_rec = layer(x, use_cache=True)
    torch.testing.assert_close(y_rec, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st_rec["recurrent"], st["recurrent"], rtol=1e-9, atol=1e-9)


def test_mom_layer_routing_and_state():
    torch.manual_seed(3)
    layer = MoMLayer(32, num_heads=2, head_dim=8, num_memories=4, top_k=2).double()
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    w = layer.routing(x)
    assert w.shape == (2, 10, 5)
    assert ((w[..., :4] != 0).sum(-1) == 2).all() and torch.equal(w[..., 4], torch.ones(2, 10, dtype=w.dtype))
    torch.testing.assert_close(w[..., :4].sum(-1), torch.ones(2, 10, dtype=w.dtype))
    y, st = layer(x, use_cache=True)
    assert y.shape == x.shape and st["recurrent"].shape == (2, 2, 5, 8, 16)
    layer.mode = "recurrent"
    y_rec, st_rec = layer(x, use_cache=True)
    torch.testing.assert_close(y_rec, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(st_rec["recurrent"], st["recurrent"], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"top_k must be an int in \[1, num_memories=4\], got 5"):
        MoMLayer(32, 2, top_k=5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        KDALayer(16, 2, 8, mode="fused")
    with pytest.raises(ValueError, match="num_heads must be a positive int, got 0"):
        GLALayer(16, 0)
    with pytest.raises(ValueError, match="num_kv_heads must be a positive int dividing num_heads=4, got 3"):
        GatedDeltaNetLayer(32, 4, num_kv_heads=3)
    layer = KDALayer(16, 2, 8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, hidden_size=16\), got \(2, 16\)"):
        layer(torch.randn(2, 16))
    with pytest.raises(TypeError, match="state must be a dict"):
        layer(torch.randn(1, 2, 16), state=torch.zeros(1))


def test_short_convolution_matches_conv1d():
    from anyattn.nn.linear_layers import ShortConvolution
    conv = ShortConvolution(6, 4, bias=True, activation=False).double()
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), conv.weight, conv.bias,
                                     groups=6).transpose(1, 2)
    y, cache = conv(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(cache, x[:, -3:])


def test_published_widths_and_gate_initialisation():
    """fla's layers: GLA key width hidden/2 and value width hidden; Gated DeltaNet A ~ U(0, 16) and KDA's
    per-channel dt_bias = softplus^-1(dt) with dt in [1e-3, 0.1] (so the initial decay is slow)."""
    torch.manual_seed(4)
    gla = GLALayer(64, 2)
    assert (gla.head_dim, gla.head_v_dim) == (16, 32) and gla.o_proj.in_features == 64
    assert GLALayer(64, 2, expand_v=0.5).head_v_dim == 16
    with pytest.raises(ValueError, match=r"hidden_size \* expand_v must be a positive multiple of num_heads=3"):
        GLALayer(64, 3, head_dim=8)
    A = GatedDeltaNetLayer(64, 64, head_dim=2).A_log.exp()              # 64 draws of U(0, 16)
    assert A.min() < 1 and A.max() <= 16
    gdn = GatedDeltaNetLayer(64, 2)
    kda = KDALayer(64, 2)
    dt = torch.nn.functional.softplus(kda.dt_bias)
    assert kda.dt_bias.shape == (64,) and dt.min() >= 1e-4 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    for layer in (gdn, kda):
        g = layer.gates(torch.zeros(1, 1, 64))[0]
        assert (g < 0).all() and g.min() > -16 * 0.1 * (1 + 1e-4)


def test_gated_deltanet_without_output_gate():
    """use_gate=False (fla's option, Zoology's MQAR setting): no g_proj, y = o_proj(RMSNorm(o))."""
    torch.manual_seed(5)
    layer = GatedDeltaNetLayer(32, 2, 8, use_gate=False, norm_eps=1e-12).double()
    assert not hasattr(layer, "g_proj") and all("g_proj" not in k for k in layer.state_dict())
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    seen = {}
    layer.o_proj.register_forward_hook(lambda m, inp, out: seen.setdefault("o", inp[0]))
    layer(x)
    o = seen["o"].reshape(1, 6, 2, 16)
    torch.testing.assert_close(o.pow(2).mean(-1), torch.ones(1, 6, 2, dtype=torch.float64), rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="use_gate must be a bool, got int"):
        GatedDeltaNetLayer(32, 2, use_gate=1)
