"""Grid and time-series layers of issue 16: the DiNAT schedule and block, AFF (against the dense circular
convolution), SS2D (against four separate recurrent scans) and SerpentBlock, ChimeraLayer (rows vs
wavefront, streaming over time); float64, gradients reach every parameter; validation."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import anyattn
from anyattn.masks import Neighborhood
from anyattn.nn import SS2D, AFFLayer, ChimeraLayer, DiNATLayer, SerpentBlock, dinat_dilations
from anyattn.ssm import selective_scan_ref


def _all_params_get_grads(module, loss):
    loss.backward()
    missing = [n for n, p in module.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_dinat_schedule():
    assert dinat_dilations(56, 7, 4) == [1, 8, 1, 8]
    assert dinat_dilations((28, 14), (7, 3), 3) == [(1, 1), (4, 4), (1, 1)]
    assert dinat_dilations(5, 7 // 2, 2) == [1, 1]
    with pytest.raises(ValueError, match="larger"):
        dinat_dilations(5, 7, 2)
    with pytest.raises(ValueError, match="one entry per axis"):
        dinat_dilations((8, 8), (3, 3, 3), 2)


def test_dinat_block_against_dense_neighborhood_reference():
    torch.manual_seed(0)
    layer = DiNATLayer(8, 2, 3, dilation=2).double()
    x = torch.randn(2, 7, 6, 8, dtype=torch.float64)
    h = layer.norm1(x)
    attn = layer.attn
    q, k, v = attn.qkv(h).view(2, 42, 3, 2, 4).permute(2, 0, 3, 1, 4)
    o = anyattn.attention(q, k, v, mask=Neighborhood((7, 6), 3, 2), method="reference")
    y = x + attn.proj(o.transpose(1, 2).reshape(2, 7, 6, 8))
    y = y + layer.mlp(layer.norm2(y))
    torch.testing.assert_close(layer(x), y)
    _all_params_get_grads(layer, layer(x).square().sum())


def test_aff_against_dense_circular_convolution():
    torch.manual_seed(1)
    layer = AFFLayer(8, num_blocks=2, init_scale=0.5).double()
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    xc = x.permute(0, 3, 1, 2)
    M = layer.mask(torch.fft.rfft2(xc, norm="ortho"))
    kernel = torch.fft.irfft2(M, s=(5, 6))                        # the per-sample, per-channel spatial kernel
    ref = torch.zeros_like(xc)
    for a, b in itertools.product(range(5), range(6)):
        ref = ref + kernel[..., a:a + 1, b:b + 1] * torch.roll(xc, (a, b), (-2, -1))
    torch.testing.assert_close(layer(x), (ref + xc).permute(0, 2, 3, 1))
    _all_params_get_grads(layer, layer(x).square().sum())
    with pytest.raises(ValueError, match="divisible"):
        AFFLayer(8, num_blocks=3)


def test_ss2d_against_four_recurrent_scans():
    torch.manual_seed(2)
    layer = SS2D(4, d_state=3).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    xs, z = layer.in_proj(x).chunk(2, -1)
    xs = F.silu(layer.conv(xs.permute(0, 3, 1, 2)))
    di = layer.d_inner
    orders = [xs.flatten(2), xs.transpose(2, 3).flatten(2)]
    orders += [o.flip(-1) for o in orders]
    y = torch.zeros(2, di, 3, 5, dtype=torch.float64)
    for kdir, seq in enumerate(orders):                           # one plain recurrent scan per direction
        dbc = torch.einsum("bdl,cd->bcl", seq, layer.x_proj[kdir])
        dt, Bm, Cm = dbc.split([layer.dt_rank, 3, 3], 1)
        sl = slice(kdir * di, (kdir + 1) * di)
        out = selective_scan_ref(seq, torch.einsum("brl,dr->bdl", dt, layer.dt_proj[kdir]), -torch.exp(layer.A_log[sl]),
                                 Bm, Cm, layer.D[sl], None, layer.dt_bias[sl], True)
        if kdir >= 2:
            out = out.flip(-1)
        y = y + (out.view(2, di, 3, 5) if kdir % 2 == 0 else out.view(2, di, 5, 3).transpose(2, 3))
    ref = layer.out_proj(layer.norm(y.permute(0, 2, 3, 1)) * F.silu(z))
    torch.testing.assert_close(layer(x), ref)


def test_serpent_block():
    torch.manual_seed(3)
    block = SerpentBlock(4, levels=2, d_state=2).double()
    x = torch.randn(1, 8, 4, 4, dtype=torch.float64)
    y = block(x)
    assert y.shape == x.shape
    for m in block.modules():
        if isinstance(m, SS2D):
            m.scan_mode = "recurrent"
    torch.testing.assert_close(block(x), y)
    _all_params_get_grads(block, y.square().sum())
    with pytest.raises(ValueError, match="divisible by 2 \\*\\* levels"):
        block(torch.randn(1, 6, 4, 4, dtype=torch.float64))


def test_chimera_layer_rows_wavefront_and_streaming():
    torch.manual_seed(4)
    layer = ChimeraLayer(6, d_state=3).double()
    x = torch.randn(2, 3, 9, 6, dtype=torch.float64)
    y, _ = layer(x)
    layer.mode = "wavefront"
    torch.testing.assert_close(layer(x)[0], y)
    layer.mode = "rows"
    state, ys = None, []
    for t0, t1 in ((0, 1), (1, 5), (5, 6), (6, 9)):
        yt, state = layer(x[:, :, t0:t1], state, use_cache=True)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 2), y)
    _all_params_get_grads(layer, y.square().sum())
    with pytest.raises(ValueError, match="heads"):
        ChimeraLayer(6, heads=("weekly",))
    with pytest.raises(ValueError, match="dim=6"):
        layer(torch.randn(2, 3, 9, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="state"):
        layer(x, state=[1])
