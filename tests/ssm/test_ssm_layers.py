
import pytest
import torch

from anyattn.nn.ssm_layers import SSM_LAYERS, LongConvLayer, Mamba2Block, MambaBlock, S4DLayer

from _ssm_helpers import assert_close

KW = {"s4d": dict(d_state=4), "mamba": dict(d_state=4), "mamba2": dict(d_state=8, headdim=8),
      "longconv": dict(max_len=20, smooth_width=3)}


@pytest.mark.parametrize("name", list(SSM_LAYERS))
def test_token_by_token_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    m = SSM_LAYERS[name](16, **KW[name]).double()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y, state = m(x, use_cache=True)
    y0, none = m(x)
    assert none is None and y.shape == x.shape
    assert_close(y0, y, 1e-12, "use_cache does not change outputs")
    s, ys = None, []
    for t in range(13):
        yt, s = m(x[:, t:t + 1], s, use_cache=True)
        ys.append(yt)
    assert_close(torch.cat(ys, 1), y, 1e-10, "token by token")
    ya, sa = m(x[:, :5], use_cache=True)                        # prefill then continue
    yb, _ = m(x[:, 5:], sa, use_cache=True)
    assert_close(torch.cat([ya, yb], 1), y, 1e-10, "prefill + continue")


@pytest.mark.parametrize("name", list(SSM_LAYERS))
def test_backward_float32(name):
    torch.manual_seed(0)
    m = SSM_LAYERS[name](16, **KW[name])
    x = torch.randn(2, 12, 16, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_mamba_published_initialization():
    torch.manual_seed(0)
    m = MambaBlock(64, d_state=16, dt_min=1e-3, dt_max=1e-1)
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * (1 - 1e-4) and dt.max() <= 1e-1 * (1 + 1e-4)
    assert m.dt_rank == 4 and m.x_proj.out_features == 4 + 32
    m2 = Mamba2Block(64, d_state=16, headdim=16)
    dt2 = torch.nn.functional.softplus(m2.dt_bias)
    assert dt2.min() >= 1e-3 * (1 - 1e-4) and dt2.max() <= 1e-1 * (1 + 1e-4)
    assert (-torch.exp(m2.A_log) <= -1).all() and (-torch.exp(m2.A_log) >= -16).all()


def test_layer_input_checks():
    m = S4DLayer(8, d_state=2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, hidden\) with hidden = 8, got \(2, 3, 7\)"):
        m(torch.randn(2, 3, 7))
    lc = LongConvLayer(8, max_len=4)
    with pytest.raises(ValueError, match="x's length must be <= max_len = 4, got 5"):
        lc(torch.randn(1, 5, 8))


def test_s4d_and_longconv_published_output_map():
    """The standalone S4D and safari's LongConv: output map Linear(h, 2h) + GLU (glu=False: Linear(h, h));
    S4D's default 32 modes are the published N = 64 real states; LongConv's kernel starts at N(0, 0.002^2)."""
    torch.manual_seed(0)
    s, lc = S4DLayer(8), LongConvLayer(8, max_len=16)
    assert s.d_state == 32 and s.out_proj.out_features == 16 and lc.out_proj.out_features == 16
    assert lc.kernel.std() < 0.004
    x = torch.randn(2, 5, 8)
    for m in (s, lc):
        y, _ = m(x)
        out_proj, m.out_proj, m.glu = m.out_proj, torch.nn.Identity(), False
        h = out_proj(m(x)[0])                                     # GELU(conv) through the output linear
        torch.testing.assert_close(y, h[..., :8] * torch.sigmoid(h[..., 8:]))
    assert S4DLayer(8, glu=False).out_proj.out_features == 8 and LongConvLayer(8, 4, glu=False).out_proj.out_features == 8
    with pytest.raises(TypeError, match="glu must be a bool, got int"):
        S4DLayer(8, glu=1)
