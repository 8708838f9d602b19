"""`anyattn tune` and the tune cache: auto follows measured winners only for the classes measured and only
where they can run the request; block sizes and neighborhood tiles come from the cache; without a cache (or
with a broken one) the built-in rules stand. The cache is isolated per test (ANYATTN_TUNE_CACHE)."""
import json

import pytest
import torch

import anyattn
from anyattn import biases, masks
from anyattn.cli import main
from anyattn.softmax import registration
from anyattn.softmax.neighborhood import default_tiles, tuned_tiles
from anyattn.tune import blocks_key, cache_path, lookup, neighborhood_key, route_key


def _write(path, entries):
    path.write_text(json.dumps({"version": 1, "machine": {}, "entries": entries}))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("ANYATTN_TUNE_CACHE", str(path))
    return path


def _qkv(N=64, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, N, 16, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


def test_no_cache_means_builtin_rules(cache):
    assert not cache.exists() and cache_path() == str(cache)
    q, k, v = _qkv()
    e = anyattn.explain(q, k, v)
    assert e.method == "sdpa" and e.measured is None


def test_cache_can_be_disabled(monkeypatch):
    for off in ("", "none", "None"):
        monkeypatch.setenv("ANYATTN_TUNE_CACHE", off)
        assert cache_path() is None and lookup("softmax_route", "x") is None


def test_measured_route_is_used_for_its_class_only(cache):
    q, k, v = _qkv()
    key = route_key("cpu", torch.float32, None, None, 64, 64, 16, False)
    _write(cache, {"softmax_route": {key: {"value": "blocked", "measured": {"sdpa": 2.0, "blocked": 1.5}}}})
    e = anyattn.explain(q, k, v)
    assert e.method == "blocked" and "anyattn tune" in e.reason and "blocked 1.5 ms, sdpa 2.0 ms" in e.reason
    assert e.measured["measured"] == {"sdpa": 2.0, "blocked": 1.5}
    out = anyattn.attention(q, k, v)
    torch.testing.assert_close(out, anyattn.attention(q, k, v, method="reference"), atol=1e-5, rtol=1e-5)
    # another size class, another dtype, or gradients wanted: not measured, the built-in rule stands
    assert anyattn.explain(*_qkv(N=256)).method == "sdpa"
    assert anyattn.explain(*_qkv(dtype=torch.bfloat16)).method == "sdpa"
    assert anyattn.explain(*_qkv(grad=True)).method == "sdpa"


def test_measured_route_that_cannot_run_the_request_is_ignored(cache):
    q, k, v = _qkv()
    pad = masks.KeyPadding(torch.tensor([50]))
    key = route_key("cpu", torch.float32, pad, None, 64, 64, 16, False)
    _write(cache, {"softmax_route": {key: {"value": "sdpa", "measured": {"sdpa": 1.0}}}})
    assert anyattn.explain(q, k, v, mask=pad).method == "blocked"
    _write(cache, {"softmax_route": {key: {"value": "no_such_method", "measured": {}}}})
    assert anyattn.explain(q, k, v, mask=pad).method == "blocked"


def test_lowrank_route_keeps_the_precision_rule(cache, monkeypatch):
    q, k, v = _qkv()
    bias = biases.Alibi.geometric(2)
    key = route_key("cpu", torch.float32, masks.Causal(), bias, 64, 64, 16, False)
    _write(cache, {"softmax_route": {key: {"value": "lowrank_bias", "measured": {"lowrank_bias": 1.0, "blocked": 3.0}}}})
    assert anyattn.explain(q, k, v, mask=masks.Causal(), bias=bias).method == "lowrank_bias"
    monkeypatch.setattr(anyattn.plan, "MAX_FACTOR_SCORE_ERROR", 0.0)
    monkeypatch.setattr(biases.Alibi, "factor_error", lambda self, n_k: 1.0, raising=False)
    assert anyattn.explain(q, k, v, mask=masks.Causal(), bias=bias).method != "lowrank_bias"


def test_blocked_reads_measured_block_sizes(cache, monkeypatch):
    seen = []
    real = registration.blocked_attention

    def spy(*args):
        seen.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(registration, "blocked_attention", spy)
    q, k, v = _qkv()
    anyattn.attention(q, k, v, mask=masks.Causal(), method="blocked")
    _write(cache, {"blocked_blocks": {blocks_key("cpu", torch.float32, masks.Causal(), 64, 64, False):
                                      {"value": [16, 32], "measured": {"blocked 16x32": 1.0}}}})
    out = anyattn.attention(q, k, v, mask=masks.Causal(), method="blocked")
    anyattn.attention(q, k, v, mask=masks.Causal(), method="blocked", block_q=8, block_k=8)
    assert seen == [(256, 512), (16, 32), (8, 8)]
    torch.testing.assert_close(out, anyattn.attention(q, k, v, mask=masks.Causal(), method="reference"),
                               atol=1e-5, rtol=1e-5)


def test_neighborhood_tiles_and_explain(cache):
    shape, ks, ones, cs = (64,), (9,), (1,), (False,)
    assert tuned_tiles(shape, ks, ones, ones, cs, torch.float32, "cpu") == default_tiles(shape, ks, ones, ones)
    key = neighborhood_key(shape, ks, ones, ones, cs, torch.float32, "cpu")
    _write(cache, {"neighborhood_tile": {key: {"value": [16], "measured": {"[16]": 1.0, "[8]": 2.0}}}})
    assert tuned_tiles(shape, ks, ones, ones, cs, torch.float32, "cpu") == (16,)
    assert tuned_tiles(shape, ks, ones, ones, cs, torch.bfloat16, "cpu") == default_tiles(shape, ks, ones, ones, True)
    q, k, v = _qkv()
    e = anyattn.explain(q, k, v, mask=masks.Neighborhood(64, 9))
    assert e.method == "neighborhood" and "tile (16,) measured by `anyattn tune`" in e.reason


def test_broken_cache_falls_back(cache):
    cache.write_text("{not json")
    assert anyattn.explain(*_qkv()).method == "sdpa"
    cache.write_text(json.dumps({"version": 999, "entries": {"softmax_route": {}}}))
    assert lookup("softmax_route", "x") is None


def test_tune_command_end_to_end(cache, capsys):
    """`anyattn tune --quick` writes the file auto reads (tiny shapes: the numbers mean nothing)."""
    assert main(["tune", "--quick", "--only", "softmax,neighborhood", "--dtypes", "float32", "--budget", "0",
                 "--no-progress"]) == 0
    assert "measured entries" in capsys.readouterr().out
    data = json.loads(cache.read_text())
    assert data["version"] == 1 and data["machine"]["quick"] is True
    routes = data["entries"]["softmax_route"]
    key = route_key("cpu", torch.float32, None, None, 64, 64, 64, False)
    assert routes[key]["value"] in ("sdpa", "blocked") and set(routes[key]["measured"]) == {"sdpa", "blocked"}
    assert data["entries"]["neighborhood_tile"]
    q = torch.randn(1, 8, 64, 64)
    e = anyattn.explain(q, q, q)
    assert e.method == routes[key]["value"] and e.measured is not None
    # a second run merges into the file instead of replacing it
    assert main(["tune", "--quick", "--only", "linear", "--dtypes", "float32", "--budget", "0", "--no-progress"]) == 0
    data = json.loads(cache.read_text())
    assert data["entries"]["linear_chunk"] and data["entries"]["softmax_route"]


def test_bias_classes_are_told_apart():
    from anyattn.tune.keys import bias_kind
    t5 = biases.RelativePosition.t5(torch.randn(32, 2), True, 128)
    swin = biases.RelativePosition.swin(torch.randn(15 * 15, 2), (8, 8))
    kinds = {bias_kind(t5), bias_kind(swin), bias_kind(biases.Alibi.geometric(2)), bias_kind(None)}
    assert len(kinds) == 4
