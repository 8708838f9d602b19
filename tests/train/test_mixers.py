import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.nn import MIXERS, Attention
from anyattn.train.mixers import (NOT_SEQUENCE_MIXERS, LayerSpec, WindowedAttention, build_mixer, build_pattern,
                                  parse_mixers, parse_value, state_size, valid_options)

W, L = 32, 24


def test_parse_values():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.5") == 0.5 and parse_value("1e-3") == 1e-3
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("none") is None
    assert parse_value("16/8") == (16, 8)
    assert parse_value("performer") == "performer"


@settings(deadline=None, max_examples=25)
@given(st.one_of(st.integers(-10 ** 6, 10 ** 6), st.floats(allow_nan=False, allow_infinity=False), st.booleans()))
def test_parse_value_round_trips(v):
    assert parse_value(str(v)) == v and type(parse_value(str(v))) is type(v)


def test_parse_mixers_entries_patterns_options():
    got = parse_mixers(" attention:method=performer , gated_deltanet+gated_deltanet+attention:window=16,"
                       "linear_attention:feature_map=relu:normalize=false")
    assert [e for e, _ in got] == ["attention:method=performer", "gated_deltanet+gated_deltanet+attention:window=16",
                                   "linear_attention:feature_map=relu:normalize=false"]
    assert got[0][1] == (LayerSpec("attention", {"method": "performer"}),)
    assert [s.name for s in got[1][1]] == ["gated_deltanet", "gated_deltanet", "attention"]
    assert got[1][1][2].options == {"window": 16}
    assert got[2][1][0].options == {"feature_map": "relu", "normalize": False}
    assert got[2][1][0].text == "linear_attention:feature_map=relu:normalize=False"


@pytest.mark.parametrize("text, match", [
    ("attentoin", r"unknown mixer 'attentoin'.*'attention'"),
    ("gla:heads=2", r"no option 'heads'.*'num_heads'"),
    ("attention:method", "key=value"),
    ("attention,,gla", "empty mixer entry"),
    ("attention+", "empty layer"),
    ("", "non-empty"),
    ("attention:causal=false", "causal"),
    ("ss2d", "2-D grid"),
])
def test_parse_errors_name_the_valid_choices(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mixers(text)


def test_options_come_from_the_constructor():
    assert "feature_map" in valid_options("linear_attention") and "hidden_size" not in valid_options("gla")
    assert "window" in valid_options("attention") and "device" not in valid_options("attention")
    assert "max_len" in valid_options("longconv")


def test_rejected_layers_are_not_in_mixers():
    assert not set(NOT_SEQUENCE_MIXERS) & set(MIXERS)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_mixer_builds_and_is_causal(name):
    torch.manual_seed(0)
    layer = build_mixer(name, {}, W, L)
    x = torch.randn(2, L, W)
    y, _ = layer(x)
    assert y.shape == (2, L, W) and torch.isfinite(y).all()
    x2 = x.clone()
    x2[:, L // 2:] = torch.randn(2, L - L // 2, W)
    y2, _ = layer(x2)
    torch.testing.assert_close(y2[:, :L // 2], y[:, :L // 2], rtol=1e-4, atol=1e-5)   # no peeking ahead
    assert state_size(layer, L) > 0


def test_defaults_and_options():
    a = build_mixer("attention", {}, 64, 128)
    assert isinstance(a, Attention) and a.num_heads == 2 and a.causal
    assert build_mixer("attention", {"num_heads": 1}, 64, 128).num_heads == 1
    assert build_mixer("longconv", {}, 16, 40).max_len == 40
    assert build_mixer("gated_deltanet", {}, 64, 8).num_heads == 2
    m2 = build_mixer("mamba2", {}, 48, 8)
    assert (2 * 48) % m2.headdim == 0
    with pytest.raises(ValueError, match="mixer 'gla'.*num_heads"):
        build_mixer("gla", {"num_heads": 0}, 32, 8)
    with pytest.raises(ValueError, match="needs window"):
        build_mixer("attention", {"method": "neighborhood"}, 32, 8)
    assert len(build_pattern(parse_mixers("gla+attention")[0][1], 32, 8)) == 2


def test_window_attention():
    torch.manual_seed(0)
    x = torch.randn(2, L, W)
    full = build_mixer("attention", {}, W, L)
    for opts in ({"window": 6}, {"window": 6, "method": "neighborhood"}):
        win = build_mixer("attention", opts, W, L)
        assert isinstance(win, WindowedAttention)
        win.load_state_dict(full.state_dict())
        y, yw = full(x)[0], win(x)[0]
        torch.testing.assert_close(yw[:, :6], y[:, :6], rtol=1e-5, atol=1e-6)          # window not yet full
        assert (yw[:, 6:] - y[:, 6:]).abs().max() > 1e-3
        x2 = x.clone()
        x2[:, :L - 6] += 1.0                                                        # tokens outside the last window
        torch.testing.assert_close(win(x2)[0][:, -1], yw[:, -1], rtol=1e-5, atol=1e-6)
    big = build_mixer("attention", {"window": 4 * L}, W, L)
    big.load_state_dict(full.state_dict())
    torch.testing.assert_close(big(x)[0], full(x)[0], rtol=1e-5, atol=1e-6)
    assert state_size(build_mixer("attention", {"window": 6, "num_heads": 1}, W, L), L) == 2 * 6 * W
    with pytest.raises(ValueError, match="decode"):
        build_mixer("attention", {"window": 6}, W, L)(x, use_cache=True)


def test_state_sizes():
    a = build_mixer("attention", {"num_kv_heads": 1}, 64, 100)
    assert state_size(a, 100) == 2 * 100 * 1 * 32 and state_size(a, 50) == 2 * 50 * 32       # grows with L
    la = build_mixer("linear_attention", {}, 64, 100)                                 # 2 heads of 32, normalizer
    assert state_size(la, 100) == 2 * 32 * 33 == state_size(la, 7)
    assert state_size(build_mixer("longconv", {}, 16, 100), 100) == 16 * 100
    assert state_size(build_mixer("s4d", {"d_state": 8}, 16, 10), 10) == 2 * 16 * 8          # complex
    g = build_mixer("gated_deltanet", {"use_short_conv": False}, 64, 10)
    assert state_size(g, 10) == g.num_heads * g.head_dim * g.head_v_dim
