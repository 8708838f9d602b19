"""Issue-15 mixer layers (LightNet, Flowformer, TransNormer norm/diag, Titans mac/mag/mal, Local Linear
Attention, Parallax): token-by-token
decoding and prefill-then-decode equal the full forward; gradients reach every parameter; registered
in MIXERS; the generate loop and beam reordering drive them; bad arguments."""
import pytest
import torch

from anyattn.nn import MIXERS, TitansLayer, TransNormerLayer, generate, reorder_states, transnormer_layers

CONFIGS = [
    ("lightnet", {}),
    ("lightnet", {"num_kv_heads": 1, "mode": "recurrent"}),
    ("flowformer", {}),
    ("transnormer", {"attention": "norm"}),
    ("transnormer", {"attention": "diag", "block_size": 5}),
    ("titans", {"variant": "mag", "window": 6, "chunk_size": 4}),
    ("titans", {"variant": "mal", "window": 5, "chunk_size": 3, "num_persistent": 2}),
    ("titans", {"variant": "mac", "segment_size": 6, "chunk_size": 4}),
    ("titans", {"variant": "mac", "segment_size": 5, "chunk_size": 2, "num_persistent": 0, "mode": "recurrent"}),
    ("local_linear", {"mode": "dense"}),
    ("local_linear", {"mode": "blocked", "cg_iters": 30}),
    ("parallax", {}),
]


def layer_of(name, kw, seed=0):
    torch.manual_seed(seed)
    return MIXERS[name](24, num_heads=2, head_dim=6, **kw).double()


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_decode_and_prefill_equal_full(name, kw):
    layer = layer_of(name, kw)
    x = torch.randn(2, 17, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_full, st_full = layer(x, use_cache=True)
    assert y_full.shape == x.shape and torch.isfinite(y_full).all()
    y_none, st_none = layer(x)
    assert st_none is None
    torch.testing.assert_close(y_none, y_full, rtol=1e-12, atol=1e-12)
    state, ys = None, []
    for t in range(17):
        y_t, state = layer(x[:, t:t + 1], state=state, use_cache=True)
        ys.append(y_t)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-9, atol=1e-9)
    ya, st = layer(x[:, :7], use_cache=True)
    yb, st = layer(x[:, 7:9], state=st, use_cache=True)
    yc, _ = layer(x[:, 9:], state=st, use_cache=True)
    torch.testing.assert_close(torch.cat([ya, yb, yc], 1), y_full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,kw", CONFIGS[::2])
def test_gradients_reach_every_parameter(name, kw):
    layer = MIXERS[name](16, num_heads=2, head_dim=4, **kw)
    x = torch.randn(2, 13, 16, requires_grad=True)
    y, _ = layer(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_generate_and_reorder_drive_a_stack():
    torch.manual_seed(3)
    stack = [TitansLayer(16, 2, variant="mac", segment_size=4, chunk_size=2), TransNormerLayer(16, 2, attention="diag", block_size=3),
             MIXERS["lightnet"](16, 2)]
    prompt = torch.randn(2, 6, 16)
    out, states = generate(stack, prompt, 5)
    assert out.shape == (2, 5, 16)
    swapped = reorder_states(states, torch.tensor([1, 0]))
    torch.testing.assert_close(swapped[0]["memory"].M, states[0]["memory"].M.flip(0))
    assert swapped[0]["memory"].offset == states[0]["memory"].offset


def test_transnormer_stack_and_diag_is_blockwise():
    layers = transnormer_layers(4, 16, 2, block_size=4)
    assert [l.attention for l in layers] == ["diag", "diag", "norm", "norm"]
    layer = TransNormerLayer(16, 2, attention="diag", block_size=4).double()
    x = torch.randn(1, 8, 16, dtype=torch.float64)
    y, _ = layer(x)
    y2, _ = layer(torch.cat([torch.randn(1, 4, 16, dtype=torch.float64), x[:, 4:]], 1))
    torch.testing.assert_close(y[:, 4:], y2[:, 4:])                 # the second block does not see the first


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant must be 'mac', 'mag' or 'mal', got 'mat'"):
        TitansLayer(16, 2, variant="mat")
    with pytest.raises(ValueError, match="window must be a positive int, got 0"):
        TitansLayer(16, 2, window=0)
    with pytest.raises(ValueError, match="attention must be 'norm' or 'diag'"):
        TransNormerLayer(16, 2, attention="soft")
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, hidden_size=16\)"):
        TitansLayer(16, 2)(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="state must be a dict"):
        MIXERS["flowformer"](16, 2)(torch.randn(1, 3, 16), state=(1,))
