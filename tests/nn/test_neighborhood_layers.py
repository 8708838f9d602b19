"""NeighborhoodAttention1d/2d/3d layers and the rotary embedding helpers (issue 4)."""
import pytest
import torch

from anyattn.nn.neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from anyattn.nn.rotary import RotaryEmbedding, apply_rotary
from anyattn.softmax.neighborhood import neighborhood


def _manual(layer, x, spatial):
    """The layer's computation written out with the plain engine (and torch ops)."""
    B, H, Dh = x.shape[0], layer.num_heads, layer.head_dim
    qkv = layer.qkv(x).reshape(B, *spatial, 3, H, Dh)
    q, k, v = (qkv[..., i, :, :].movedim(-2, 1) for i in range(3))
    if layer.rope is not None:
        cos, sin = layer.rope.axial(spatial, dtype=x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = neighborhood(q, k, v, layer.kernel_size, layer.dilation, layer.stride, layer.is_causal)
    return layer.proj(o.movedim(1, -2).reshape(B, *spatial, layer.dim))


@pytest.mark.parametrize("cls,spatial,kw", [
    (NeighborhoodAttention1d, (19,), dict(kernel_size=5, dilation=2, is_causal=True)),
    (NeighborhoodAttention2d, (7, 9), dict(kernel_size=(3, 4), stride=(1, 2), rotary=True)),
    (NeighborhoodAttention3d, (4, 5, 6), dict(kernel_size=(2, 3, 3), is_causal=(True, False, False), rotary=True)),
])
def test_layer_matches_manual_and_trains(cls, spatial, kw):
    torch.manual_seed(0)
    layer = cls(24, 2, **kw).double()
    x = torch.randn(2, *spatial, 24, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, _manual(layer, x, spatial), atol=1e-12, rtol=1e-10)
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
    assert "kernel_size" in repr(layer)


def test_layer_gradients_match_dense_reference():
    # The whole layer against the same layer computed with the dense reference oracle on the
    # flattened grid (masks.Neighborhood + method="reference"): input and parameter gradients.
    import anyattn
    from anyattn.masks.neighborhood import Neighborhood
    torch.manual_seed(1)
    layer = NeighborhoodAttention2d(8, 2, kernel_size=(3, 2), dilation=(1, 2), is_causal=(False, True),
                                    rotary=True).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64, requires_grad=True)
    spec = Neighborhood((4, 5), (3, 2), (1, 2), 1, (False, True))

    def dense(t):
        B = t.shape[0]
        qkv = layer.qkv(t).reshape(B, 4, 5, 3, 2, 4)
        q, k, v = (qkv[..., i, :, :].movedim(-2, 1) for i in range(3))
        cos, sin = layer.rope.axial((4, 5), dtype=t.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = anyattn.attention(q.reshape(B, 2, 20, 4), k.reshape(B, 2, 20, 4), v.reshape(B, 2, 20, 4), mask=spec,
                              method="reference")
        return layer.proj(o.reshape(B, 2, 4, 5, 4).movedim(1, -2).reshape(B, 4, 5, 8))
    params = [x] + list(layer.parameters())
    g = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    a = torch.autograd.grad((layer(x) * g).sum(), params)
    b = torch.autograd.grad((dense(x) * g).sum(), params)
    for u, w in zip(a, b):
        torch.testing.assert_close(u, w, atol=1e-11, rtol=1e-9)


def test_layer_additional_tokens_and_errors():
    layer = NeighborhoodAttention1d(16, 2, kernel_size=3)
    x = torch.randn(1, 10, 16)
    ak, av = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    assert layer(x, ak, av).shape == x.shape
    with pytest.raises(ValueError, match=r"x must have shape \(B, n1, dim=16\)"):
        layer(torch.randn(1, 10, 12))
    with pytest.raises(ValueError, match=r"dim \(10\) must be a multiple of num_heads \(3\)"):
        NeighborhoodAttention2d(10, 3, kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size \\* dilation"):
        NeighborhoodAttention2d(8, 2, kernel_size=5)(torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match="rotary needs head_dim >= 2 \\* 3"):
        NeighborhoodAttention3d(8, 4, kernel_size=1, rotary=True)


def test_rotary_relative_positions_1d_and_axial():
    torch.manual_seed(0)
    rope = RotaryEmbedding(8)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def dot(m, n):
        cm, sm = rope(torch.tensor(m), dtype=torch.float64)
        cn, sn = rope(torch.tensor(n), dtype=torch.float64)
        return (apply_rotary(q, cm, sm) * apply_rotary(k, cn, sn)).sum()
    torch.testing.assert_close(dot(3, 1), dot(12, 10))
    torch.testing.assert_close(dot(0, 0), (q * k).sum())
    # norms are preserved
    c, s = rope(torch.arange(5))
    x = torch.randn(5, 8)
    torch.testing.assert_close(apply_rotary(x, c, s).norm(dim=-1), x.norm(dim=-1))
    # axial: relative per axis; dim 10 with 2 axes -> 2 slots each, leftover slot 4 has angle 0
    rope2 = RotaryEmbedding(10)
    c, s = rope2.axial((6, 7), dtype=torch.float64)
    assert c.shape == (6, 7, 5)
    assert (c[..., 4] == 1).all() and (s[..., 4] == 0).all()
    q, k = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)

    def dot2(a, b):
        return (apply_rotary(q, c[a], s[a]) * apply_rotary(k, c[b], s[b])).sum()
    torch.testing.assert_close(dot2((4, 5), (1, 2)), dot2((3, 6), (0, 3)))
    # the first axis' slots equal the 1-D embedding of a head dim of 2 * per-axis slots
    c1, s1 = RotaryEmbedding(4)(torch.arange(6), dtype=torch.float64)
    torch.testing.assert_close(c[:, 0, :2], c1)


def test_rotary_errors():
    with pytest.raises(ValueError, match="dim must be even"):
        RotaryEmbedding(7)
    with pytest.raises(ValueError, match="base must be a number > 1"):
        RotaryEmbedding(8, base=1)
    c, s = RotaryEmbedding(8)(torch.arange(3))
    with pytest.raises(ValueError, match="cos/sin rotate 2 \\* 4 = 8 channels but x has only 6"):
        apply_rotary(torch.randn(3, 6), c, s)
    with pytest.raises(ValueError, match="shape must be 1 to 3 positive ints"):
        RotaryEmbedding(8).axial((1, 2, 3, 4))
