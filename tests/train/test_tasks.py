"""anyattn.train.tasks: MQAR (Zoology's distribution) and selective copying, their invariants and errors."""
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from anyattn.train.tasks import RecallBatch, mqar, mqar_gap_probs, selective_copy, split_seed


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    return float(((counts.double() - expected) ** 2 / expected).sum())


@st.composite
def mqar_options(draw):
    n = draw(st.integers(1, 6))
    seq_len = 2 * draw(st.integers(2 * n, 2 * n + 12))
    vocab = draw(st.integers(2 * (n + 1), 80))
    return dict(seq_len=seq_len, num_kv_pairs=n, vocab_size=vocab, seed=draw(st.integers(0, 2 ** 40)))


@given(opts=mqar_options(), num=st.integers(1, 5))
def test_mqar_invariants(opts, num):
    b = mqar(num, **opts)
    n, L, V = opts["num_kv_pairs"], opts["seq_len"], opts["vocab_size"]
    assert isinstance(b, RecallBatch)
    assert b.inputs.shape == (num, L) and b.positions.shape == b.targets.shape == (num, n)
    assert b.inputs.dtype == b.positions.dtype == b.targets.dtype == torch.long
    assert 0 <= int(b.inputs.min()) and int(b.inputs.max()) < V
    for row, pos, tgt in zip(b.inputs.tolist(), b.positions.tolist(), b.targets.tolist()):
        keys, values = row[0:2 * n:2], row[1:2 * n:2]
        assert all(1 <= k < V // 2 for k in keys) and all(V // 2 <= v < V for v in values)
        assert len(set(keys)) == n and len(set(values)) == n
        pair = dict(zip(keys, values))
        # queries after the context, at even offsets from it, distinct and increasing
        assert pos == sorted(set(pos)) and all(p >= 2 * n and (p - 2 * n) % 2 == 0 and p <= L - 2 for p in pos)
        queried = [row[p] for p in pos]
        assert sorted(queried) == sorted(keys)  # each key queried exactly once
        assert tgt == [pair[k] for k in queried]  # the target is the queried key's value


def test_mqar_gap_distribution_single_pair():
    """With one pair the gap is one draw from mqar_gap_probs: chi-square on 20000 examples
    (df 18, mean 18, sd 6); a uniform gap (power_a = 1) gives chi-square in the thousands."""
    seq_len = 40
    p = mqar_gap_probs(seq_len, 1)
    assert p.shape == (19,) and math.isclose(float(p.sum()), 1.0)
    assert math.isclose(float(p[1] / p[0]), 2.0 ** -0.99)
    gaps = (mqar(20000, seq_len=seq_len, num_kv_pairs=1, vocab_size=64, seed=3).positions[:, 0] - 2) // 2
    counts = torch.bincount(gaps, minlength=19)
    assert _chi2(counts, p.to(counts.device)) < 60
    uniform = (mqar(20000, seq_len=seq_len, num_kv_pairs=1, vocab_size=64, seed=3, power_a=1.0)
               .positions[:, 0] - 2) // 2
    assert _chi2(torch.bincount(uniform, minlength=19), p.to(uniform.device)) > 1000


def _exact_inclusion(p: list[float], k: int) -> list[float]:
    """P(gap g is among the k drawn) for successive draws without replacement, by enumeration."""
    incl = [0.0] * len(p)
    for seq in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for g in seq:
            prob *= p[g] / left
            left -= p[g]
        for g in seq:
            incl[g] += prob
    return incl


def test_mqar_gap_distribution_without_replacement():
    """Three pairs among seven gap slots: each gap's inclusion frequency over 30000 examples is within
    5 binomial standard deviations of the exact probability of sequential weighted sampling."""
    n, space, num = 3, 7, 30000
    seq_len = 2 * n + 2 * space
    p = mqar_gap_probs(seq_len, n).tolist()
    exact = _exact_inclusion(p, n)
    assert math.isclose(sum(exact), n)
    gaps = (mqar(num, seq_len=seq_len, num_kv_pairs=n, vocab_size=64, seed=11).positions - 2 * n) // 2
    freq = (torch.bincount(gaps.flatten(), minlength=space).double() / num).tolist()
    for f, e in zip(freq, exact):
        assert abs(f - e) <= 5 * math.sqrt(e * (1 - e) / num) + 1e-9, (freq, exact)
    # the naive alternative (inclusion proportional to p) is far from it, so the check can fail
    assert max(abs(n * q - e) for q, e in zip(p, exact)) > 0.05


def test_mqar_keys_values_noise_uniform():
    """Keys uniform over [1, V/2) in every context slot (also the last: order is random), values over
    [V/2, V), noise over [0, V): chi-square, df 14 / 15 / 31, bound 60."""
    V, n, num = 32, 4, 20000
    b = mqar(num, seq_len=20, num_kv_pairs=n, vocab_size=V, seed=5)
    for slot in (0, 2 * n - 2):
        counts = torch.bincount(b.inputs[:, slot] - 1, minlength=15)
        assert counts.numel() == 15 and _chi2(counts, counts.new_full((15,), 1 / 15, dtype=torch.float64)) < 60
    counts = torch.bincount(b.inputs[:, 2 * n - 1] - V // 2, minlength=16)
    assert counts.numel() == 16 and _chi2(counts, counts.new_full((16,), 1 / 16, dtype=torch.float64)) < 60
    noise = b.inputs[:, 2 * n + 1::2].flatten()  # odd offsets after the context never hold a query
    counts = torch.bincount(noise, minlength=V)
    assert _chi2(counts, counts.new_full((V,), 1 / V, dtype=torch.float64)) < 80


def test_mqar_seeds():
    opts = dict(seq_len=64, num_kv_pairs=8, vocab_size=256)
    a, b = mqar(16, seed=7, **opts), mqar(16, seed=7, **opts)
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values()))
    train, test = mqar(16, seed=split_seed(7, "train"), **opts), mqar(16, seed=split_seed(7, "test"), **opts)
    assert not torch.equal(train.inputs, test.inputs)
    assert split_seed(7, "train") == 14 and split_seed(7, "test") == 15
    train_seeds = {split_seed(s, "train") for s in range(100)}
    assert train_seeds.isdisjoint(split_seed(s, "test") for s in range(100))


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seq_len=63), ValueError, "seq_len must be even"),
    (dict(seq_len=28), ValueError, r"seq_len must be >= 4 \* num_kv_pairs = 32"),
    (dict(vocab_size=17), ValueError, "vocab_size must be >= 18"),
    (dict(power_a=0.0), ValueError, "power_a must be a finite float > 0"),
    (dict(power_a=float("nan")), ValueError, "power_a"),
    (dict(num_kv_pairs=0), ValueError, "num_kv_pairs must be >= 1"),
    (dict(seq_len=64.0), TypeError, "seq_len must be an int"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=True), TypeError, "seed must be an int"),
])
def test_mqar_errors(kwargs, error, match):
    opts = dict(seq_len=64, num_kv_pairs=8, vocab_size=256, seed=0) | kwargs
    with pytest.raises(error, match=match):
        mqar(4, **opts)


def test_mqar_num_examples_and_split_errors():
    with pytest.raises(ValueError, match="num_examples must be >= 1"):
        mqar(0, seq_len=64, num_kv_pairs=8, vocab_size=256, seed=0)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        split_seed(0, "val")


@given(m=st.integers(1, 6), extra=st.integers(0, 20), vocab=st.integers(3, 12), num=st.integers(1, 4),
       seed=st.integers(0, 2 ** 40))
def test_selective_copy_invariants(m, extra, vocab, num, seed):
    L = 2 * m + extra
    b = selective_copy(num, seq_len=L, num_tokens=m, vocab_size=vocab, seed=seed)
    assert b.inputs.shape == (num, L) and b.positions.shape == b.targets.shape == (num, m)
    region = L - m
    assert b.positions.tolist() == [list(range(region, L))] * num
    for row, tgt in zip(b.inputs.tolist(), b.targets.tolist()):
        assert all(1 <= t <= vocab - 2 for t in tgt)
        assert row[region:] == [vocab - 1] * m  # the markers
        assert [t for t in row[:region] if t != 0] == tgt  # the data tokens, in order, among blanks
        assert vocab - 1 not in row[:region]


def test_selective_copy_positions_uniform_and_seeded():
    """Data-token slots are a uniformly random subset of the region: every slot filled with probability
    m / R (5 sd on 4000 examples)."""
    m, L, num = 4, 24, 4000
    b = selective_copy(num, seq_len=L, num_tokens=m, vocab_size=10, seed=1)
    filled = (b.inputs[:, :L - m] != 0).double().mean(dim=0)
    q = m / (L - m)
    assert float((filled - q).abs().max()) < 5 * math.sqrt(q * (1 - q) / num)
    again = selective_copy(num, seq_len=L, num_tokens=m, vocab_size=10, seed=1)
    assert torch.equal(b.inputs, again.inputs)
    assert not torch.equal(b.inputs, selective_copy(num, seq_len=L, num_tokens=m, vocab_size=10, seed=2).inputs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seq_len=15), ValueError, r"seq_len must be >= 2 \* num_tokens = 16"),
    (dict(vocab_size=2), ValueError, "vocab_size must be >= 3"),
    (dict(num_tokens=0), ValueError, "num_tokens must be >= 1"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_selective_copy_errors(kwargs, error, match):
    opts = dict(seq_len=32, num_tokens=8, vocab_size=16, seed=0) | kwargs
    with pytest.raises(error, match=match):
        selective_copy(4, **opts)
