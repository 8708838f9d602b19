"""anyattn.nn.attention.Attention: projections, GQA, rotary, cached == uncached, gradients, errors."""
import pytest
import torch

import anyattn
from anyattn.cache import KVCache, TokenSelect
from anyattn.nn.attention import Attention


def _x(B, N, dim, seed=0):
    return torch.randn(B, N, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _layer(**kw):
    torch.manual_seed(0)
    return Attention(32, 4, kw.pop("num_kv_heads", 2), dtype=torch.float64, **kw)


def _manual(layer, x):
    """The layer written out with the float64 reference attention."""
    B, N, _ = x.shape
    q, k, v = layer.qkv(x)
    o = anyattn.attention(q, k, v, mask=anyattn.masks.Causal() if layer.causal else None, method="reference")
    return layer.o_proj(o.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("kv", [4, 2, 1])
@pytest.mark.parametrize("rotary", [True, False])
def test_uncached_forward_and_gradients_match_reference(kv, rotary):
    layer = _layer(num_kv_heads=kv, rotary=rotary)
    x = _x(2, 9, 32).requires_grad_()
    y, state = layer(x)
    assert state is None and y.shape == (2, 9, 32)
    ref = _manual(layer, x)
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-10)
    w = _x(2, 9, 32, seed=1)
    params = [x] + list(layer.parameters())
    g1 = torch.autograd.grad((y * w).sum(), params)
    g2 = torch.autograd.grad((_manual(layer, x) * w).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("chunks", [[9], [5, 1, 1, 2], [1] * 4])
def test_cached_prefill_and_steps_equal_uncached(chunks):
    layer = _layer()
    x = _x(2, sum(chunks), 32)
    full, _ = layer(x)
    state, outs, t = None, [], 0
    for c in chunks:
        y, state = layer(x[:, t:t + c], state=state, use_cache=True)
        outs.append(y)
        t += c
    assert isinstance(state, KVCache) and state.lengths_list() == [sum(chunks)] * 2
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-10, rtol=1e-10)


def test_ragged_cache_positions_continue_per_sequence():
    # Sequence 1 was truncated (e.g. speculative rollback): its next token sits at its own position.
    layer = _layer()
    x = _x(2, 6, 32)
    _, state = layer(x, use_cache=True)
    state.truncate([6, 4])
    x1 = _x(2, 1, 32, seed=3)
    y, state = layer(x1, state=state)
    full0, _ = layer(torch.cat([x[:1], x1[:1]], 1))
    full1, _ = layer(torch.cat([x[1:, :4], x1[1:]], 1))
    torch.testing.assert_close(y[0], full0[0, -1:], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y[1], full1[0, -1:], atol=1e-10, rtol=1e-10)


def test_cache_options_reach_the_cache():
    layer = _layer(cache_options={"policy": TokenSelect(n_init=2, n_local=2, k=2), "quantize": "int8"})
    _, state = layer(_x(1, 5, 32), use_cache=True)
    assert state.quantize == "int8" and isinstance(state.policy, TokenSelect)


def test_rotary_gives_relative_positions():
    # Shifting every position by the same offset (a cache offset) leaves the attention scores unchanged.
    layer = _layer(num_kv_heads=4)
    x = _x(1, 5, 32)
    q0, k0, _ = layer.qkv(x)
    q1, k1, _ = layer.qkv(x, offset=torch.tensor([7]))
    torch.testing.assert_close(q0 @ k0.transpose(-1, -2), q1 @ k1.transpose(-1, -2), atol=1e-10, rtol=1e-10)
    assert (q0 - q1).abs().max() > 1e-3
    plain = _layer(rotary=False)
    assert plain.rope is None


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        Attention(32, 4, 3)
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        Attention(30, 4)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        Attention(32, 4, rotary_dim=3)
    layer = _layer()
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, dim=32\), got \(2, 5, 16\)"):
        layer(_x(2, 5, 16))
    with pytest.raises(TypeError, match="state must be None or the KVCache"):
        layer(_x(2, 5, 32), state={"recurrent": None})
    _, st = layer(_x(2, 3, 32), use_cache=True)
    with pytest.raises(ValueError, match="state holds 2 sequences but x has batch size 1"):
        layer(_x(1, 1, 32), state=st)
    with pytest.raises(ValueError, match="a KV cache needs causal=True"):
        _layer(causal=False)(_x(1, 2, 32), use_cache=True)
