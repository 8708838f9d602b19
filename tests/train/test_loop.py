import json
import math
import os
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from anyattn.train.loop import (LMData, RecallData, build_model, decay_groups, evaluate, lr_factor, run, train)
from anyattn.train.mixers import parse_mixers
from anyattn.train.presets import Preset, RunConfig

TINY = RunConfig("mqar", seq_len=32, num_kv_pairs=4, vocab_size=64, hidden=32, batch_size=16, lr=1e-2, steps=40,
                 eval_every=20, eval_examples=64, warmup=0.1)


def _model(text, cfg=TINY, seed=0):
    return build_model(cfg, parse_mixers(text)[0][1], seed)


def test_lr_schedule():
    f = [lr_factor(s, 100, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)                 # linear warmup, 10 steps
    assert f[10] == pytest.approx(1.0) and f[100] == pytest.approx(0.0, abs=1e-12)
    assert f[55] == pytest.approx(0.5)                                              # cosine midpoint
    assert all(a >= b for a, b in zip(f[9:], f[10:]))


def test_weight_decay_on_matrices_only():
    model = _model("gated_deltanet")
    decay, rest = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decay["params"]}
    rn = {names[id(p)] for p in rest["params"]}
    assert "embedding.weight" in dn and "mixers.0.q_proj.weight" in dn and "conv.projection.weight" in dn
    assert {"mixers.0.A_log", "mixers.0.dt_bias", "conv.conv.weight", "conv.projection.bias",
            "final_norm.weight"} <= rn
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert len(dn) + len(rn) == len(list(model.parameters()))


@pytest.mark.parametrize("text", ["attention", "gated_deltanet", "s4d", "longconv"])
def test_training_lowers_the_test_loss(text):
    cfg = replace(TINY, steps=80, eval_every=40)
    data = RecallData(cfg, seed=0)
    model = _model(text)
    before = evaluate(model, data)[0]
    r = train(model, data, cfg, progress=False)
    after = evaluate(model, data)[0]
    assert after < before - 0.25, (before, after)            # ln 64 -> below ln 32 + a bit: values learned
    assert r["steps"] == cfg.steps and r["tokens_per_s"] > 0 and 0 <= r["best"] <= 1
    assert [h[0] for h in r["history"]] == [40, 80]


def test_same_seed_same_run_different_seed_different_run():
    def once(seed):
        model = _model("gated_deltanet", seed=seed)
        r = train(model, RecallData(TINY, seed=seed), replace(TINY, steps=10, eval_every=5), progress=False)
        return r["history"], torch.cat([p.flatten() for p in model.parameters()])
    (h1, p1), (h2, p2), (h3, p3) = once(0), once(0), once(1)
    assert h1 == h2 and torch.equal(p1, p2)
    assert not torch.equal(p1, p3)


class _Interrupt(Exception):
    pass


class _StopAt:
    """Data that raises when asked for the batch of step `stop` (a crash right after a checkpoint)."""

    def __init__(self, data, stop):
        self.data, self.stop, self.metric = data, stop, data.metric

    def train_batch(self, step):
        if step == self.stop:
            raise _Interrupt
        return self.data.train_batch(step)

    def test_batches(self):
        return self.data.test_batches()


@pytest.mark.parametrize("text", ["attention", "gated_deltanet"])
def test_resume_is_bit_identical(tmp_path, text):
    cfg = replace(TINY, steps=12, eval_every=6)
    whole = _model(text)
    r_whole = train(whole, RecallData(cfg, 0), cfg, progress=False)
    ckpt = str(tmp_path / "ckpt.pt")
    with pytest.raises(_Interrupt):
        train(_model(text), _StopAt(RecallData(cfg, 0), 6), cfg, ckpt=ckpt, progress=False)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["state"]["step"] == 6 and {"model", "optimizer", "scheduler", "rng", "config"} <= set(saved)
    resumed = _model(text, seed=5)                                                 # its init is overwritten
    r = train(resumed, RecallData(cfg, 0), cfg, ckpt=ckpt, resume=True, progress=False)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert r["history"] == r_whole["history"] and r["best"] == r_whole["best"]
    with pytest.raises(ValueError, match="other settings.*'lr'"):
        train(_model(text), RecallData(cfg, 0), replace(cfg, lr=0.5), ckpt=ckpt, resume=True, progress=False)


def test_early_stop_at_target():
    cfg = replace(TINY, target=0.0)
    r = train(_model("attention"), RecallData(cfg, 0), cfg, progress=False)
    assert r["stopped_early"] and r["steps"] == cfg.eval_every


def test_fixed_training_set_cycles_in_epochs():
    cfg = replace(TINY, train_examples=40, batch_size=8)                           # 5 batches per epoch
    data = RecallData(cfg, 0)
    epoch0 = torch.cat([data.train_batch(s)[0] for s in range(5)])
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, data.pool.inputs.tolist()))
    assert not torch.equal(data.train_batch(5)[0], data.train_batch(0)[0])         # reshuffled
    assert torch.equal(RecallData(cfg, 0).train_batch(7)[0], data.train_batch(7)[0])
    assert not set(map(tuple, data.test.inputs.tolist())) & set(map(tuple, data.pool.inputs.tolist()))


def test_lm_bits_per_byte_fall_below_chance():
    text = ("the quick brown fox jumps over the lazy dog. " * 200).encode()
    corpus = SimpleNamespace(train=text, val=text[:2000])
    cfg = RunConfig("lm", seq_len=32, vocab_size=256, hidden=32, depth=1, batch_size=8, lr=1e-2, steps=30,
                    eval_every=30, eval_examples=1000)
    data = LMData(cfg, corpus, 0)
    model = _model("attention", cfg)
    assert evaluate(model, data)[1] == pytest.approx(8.0, abs=0.3)                 # ~ uniform over 256 bytes
    r = train(model, data, cfg, progress=False)
    assert r["final"] < 4.0 and r["best"] == r["final"]
    assert data.val_inputs.shape == (31, 32) and torch.equal(data.val_inputs[0, 1:], data.val_targets[0, :-1])


def test_run_writes_results_and_resumes_finished_runs(tmp_path):
    p = Preset("tiny", "mqar", (replace(TINY, steps=6, eval_every=3),), {"attention": 4})
    logs = []
    res = run("mqar", "attention,linear_attention", p, str(tmp_path), log=logs.append, progress=False)
    rows = res["runs"]
    assert [r["mixer"] for r in rows] == ["attention", "linear_attention"]
    assert [r["steps"] for r in rows] == [4, 6]                                      # per-family budget
    assert rows[0]["state_grows"] and not rows[1]["state_grows"]
    for key in ("params", "state_size", "best", "final", "tokens_per_s", "wall_s", "seed", "torch", "threads"):
        assert key in rows[0]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"][1]["best"] == rows[1]["best"]
    assert os.path.exists(tmp_path / "attention" / "ckpt.pt")
    again = run("mqar", "attention,linear_attention", p, str(tmp_path), resume=True, log=logs.append, progress=False)
    assert [r["history"] for r in again["runs"]] == [r["history"] for r in rows]


def test_run_checks_its_arguments(tmp_path):
    p = Preset("tiny", "mqar", (TINY,), {})
    with pytest.raises(ValueError, match="task"):
        run("lm", "attention", p, str(tmp_path))
    with pytest.raises(ValueError, match="seed"):
        run("mqar", "attention", p, str(tmp_path), seed=-1)
    with pytest.raises(ValueError, match="steps"):
        run("mqar", "attention", p, str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="unknown mixer"):
        run("mqar", "nope", p, str(tmp_path))
    assert math.isfinite(TINY.lr)
