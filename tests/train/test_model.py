import pytest
import torch

from anyattn.train.loop import build_model
from anyattn.train.mixers import build_pattern, parse_mixers
from anyattn.train.model import BlockModel, GatedShortConv, RecallModel
from anyattn.train.presets import RunConfig

V, W, L = 50, 32, 20


def _pattern(text):
    return parse_mixers(text)[0][1]


def _cfg(task, **kw):
    return RunConfig(task, seq_len=L, vocab_size=V, hidden=W, batch_size=4, lr=1e-3, steps=10, eval_every=5,
                     eval_examples=8, num_kv_pairs=2, **kw)


def test_gated_short_conv_is_zoology_base_conv():
    torch.manual_seed(0)
    c = GatedShortConv(4, kernel_size=3)
    u = torch.randn(2, 6, 4)
    w, b = c.conv.weight[:, 0], c.conv.bias                                          # (C, 3), taps oldest first
    pad = torch.cat([torch.zeros(2, 2, 4), u], 1)
    conv = sum(pad[:, j:j + 6] * w[:, j] for j in range(3)) + b
    torch.testing.assert_close(c(u), conv * c.projection(u) + u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls, text", [(RecallModel, "attention"), (BlockModel, "gated_deltanet"),
                                       (BlockModel, "s4d+attention")])
def test_logits_at_positions_tied_and_causal(cls, text):
    torch.manual_seed(0)
    model = cls(V, W, build_pattern(_pattern(text), W, L))
    x = torch.randint(0, V, (3, L))
    pos = torch.tensor([[2, 5, 9]] * 3)
    full = model(x)
    assert full.shape == (3, L, V)
    at = model(x, pos)
    assert at.shape == (3, 3, V)
    torch.testing.assert_close(at, full[:, [2, 5, 9]], rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % V
    torch.testing.assert_close(model(x2, pos), at, rtol=1e-5, atol=1e-6)          # later tokens unseen
    assert [n for n, p in model.named_parameters() if p.shape == (V, W)] == ["embedding.weight"]   # tied


def test_model_shapes_and_depth():
    rec = build_model(_cfg("mqar"), _pattern("gated_deltanet"), 0)
    assert isinstance(rec, RecallModel) and len(rec.mixers) == 1
    assert not any("mlp" in n for n, _ in rec.named_parameters())                    # no MLP in the recipe
    blk = build_model(_cfg("lm", depth=3), _pattern("gla"), 0)
    assert isinstance(blk, BlockModel) and len(blk.blocks) == 3
    hyb = build_model(_cfg("lm", depth=3), _pattern("gla+gla+attention"), 0)
    assert [type(m).__name__ for m in hyb.mixers] == ["GLALayer", "GLALayer", "Attention"]


def test_shared_parts_start_equal_across_mixers():
    a = build_model(_cfg("mqar"), _pattern("attention"), 3)
    b = build_model(_cfg("mqar"), _pattern("longconv"), 3)
    for name in ("embedding.weight", "conv.conv.weight", "conv.projection.weight"):
        assert torch.equal(a.state_dict()[name], b.state_dict()[name])
    c = build_model(_cfg("mqar"), _pattern("attention"), 4)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)


def test_bad_inputs():
    model = RecallModel(V, W, build_pattern(_pattern("attention"), W, L))
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(2, L))
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(2, L, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        BlockModel(0, W, build_pattern(_pattern("attention"), W, L))
    with pytest.raises(ValueError, match="at least one"):
        RecallModel(V, W, [])


def test_mqar_recipe_runs_gated_deltanet_without_output_gate():
    (mq,) = build_pattern(_pattern("gated_deltanet"), W, L, "mqar")
    (lm,) = build_pattern(_pattern("gated_deltanet"), W, L, "lm")
    (own,) = build_pattern(_pattern("gated_deltanet:use_gate=true"), W, L, "mqar")
    assert (mq.use_gate, lm.use_gate, own.use_gate) == (False, True, True)
