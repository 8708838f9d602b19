"""Synthetic recall tasks: multi-query associative recall (MQAR) and selective copying.

Both return a `RecallBatch`: `inputs` `(n, L)` token ids, and for each example `Q` scored slots,
`positions` `(n, Q)` and `targets` `(n, Q)`. The loss and accuracy are the cross-entropy / argmax of
the model's logits at `positions` against `targets` (a causal model reads `inputs[:, :p + 1]` to
predict `targets` at slot `p`); nothing else is scored.

Seeds: every generator draws from its own `torch.Generator` seeded with `seed`, so the same seed gives
the same data on every machine and run. Train and test data must come from disjoint seeds:
`split_seed(seed, "train")` is `2 * seed` and `split_seed(seed, "test")` is `2 * seed + 1`, so no run
seed's training stream is any run seed's test stream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..validate import check_positive_int

__all__ = ["RecallBatch", "mqar", "mqar_gap_probs", "selective_copy", "split_seed"]

_MAX_SEED = 2 ** 62


@dataclass
class RecallBatch:
    """inputs `(n, L)` long; positions `(n, Q)` long (increasing along Q); targets `(n, Q)` long."""
    inputs: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor


def split_seed(seed: int, split: str) -> int:
    """The generator seed of a data split: `2 * seed` for "train", `2 * seed + 1` for "test"."""
    _check_seed(seed)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return 2 * seed + (split == "test")


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**62), got {seed}")


def _distinct(rows: int, k: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """`(rows, k)` ids from `[low, high)`, no repeats within a row, each row a uniformly random ordered
    k-subset: Floyd's subset sampling (vectorized over rows, O(rows k^2)) followed by a shuffle."""
    size = high - low
    chosen = torch.empty(rows, k, dtype=torch.long)  # host: seeded CPU data
    for i, j in enumerate(range(size - k, size)):
        t = torch.randint(0, j + 1, (rows,), generator=gen)  # host: seeded CPU data
        seen = (chosen[:, :i] == t[:, None]).any(dim=1)
        chosen[:, i] = torch.where(seen, j, t)
    order = torch.rand(rows, k, generator=gen).argsort(dim=1)  # host: seeded CPU data
    return chosen.gather(1, order) + low


def mqar_gap_probs(seq_len: int, num_kv_pairs: int, power_a: float = 0.01) -> torch.Tensor:
    """The weights of one draw of a query gap in `mqar`, float64 `(S,)` with `S = (seq_len - 2 n) // 2`:
    `p(g) ∝ (g + 1) ** (power_a - 1)`, g = 0 .. S-1. The `n` gaps of an example are drawn one after the
    other without replacement, each from these weights renormalized over the gaps not yet drawn
    (as numpy's `choice(replace=False, p=p)` in Zoology)."""
    check_positive_int("seq_len", seq_len)
    check_positive_int("num_kv_pairs", num_kv_pairs)
    if isinstance(power_a, bool) or not isinstance(power_a, (int, float)) or not (
            math.isfinite(power_a) and power_a > 0):
        raise ValueError(f"power_a must be a finite float > 0, got {power_a!r}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len must be >= 4 * num_kv_pairs = {4 * num_kv_pairs} (the context k1 v1 .. kn vn "
                         f"and room for n queries at even offsets after it), got seq_len={seq_len}")
    space = (seq_len - 2 * num_kv_pairs) // 2
    p = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)  # host: seeded CPU data
    return p / p.sum()


def mqar(num_examples: int, *, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int,
         power_a: float = 0.01) -> RecallBatch:
    """Multi-query associative recall, the distribution of Zoology's `multiquery_ar` (Arora, Eyuboglu
    et al., "Zoology: Measuring and Improving Recall in Efficient Language Models", 2023).

    Each example: `n = num_kv_pairs` distinct keys from `[1, vocab_size // 2)` (token 0 is never a key,
    as in Zoology) and `n` distinct values from `[vocab_size // 2, vocab_size)`, in random order; the
    context `k1 v1 k2 v2 .. kn vn` fills slots `0 .. 2n-1`. Each key is queried once: the n gaps
    `g` are drawn without replacement from `mqar_gap_probs` and the key sits at slot `2n + 2g`; its
    target is its paired value (predicted at the key's slot). Every other slot holds a uniformly random
    token from `[0, vocab_size)`. Returns `RecallBatch` with `inputs (num_examples, seq_len)`,
    `positions`/`targets` `(num_examples, n)`, positions increasing.

    Zoology's constraints: `seq_len` even and `>= 4 n`; the vocabulary must hold n keys
    (`vocab_size // 2 - 1 >= n`).
    """
    check_positive_int("num_examples", num_examples)
    check_positive_int("seq_len", seq_len)
    check_positive_int("num_kv_pairs", num_kv_pairs)
    check_positive_int("vocab_size", vocab_size)
    _check_seed(seed)
    if seq_len % 2:
        raise ValueError(f"seq_len must be even (queries sit at even offsets after the context, as in "
                         f"Zoology), got {seq_len}")
    p = mqar_gap_probs(seq_len, num_kv_pairs, power_a)
    half = vocab_size // 2
    if half - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size must be >= {2 * (num_kv_pairs + 1)} so that keys [1, vocab_size // 2) hold "
                         f"num_kv_pairs={num_kv_pairs} distinct keys, got vocab_size={vocab_size}")
    n, k = num_examples, num_kv_pairs
    gen = torch.Generator().manual_seed(seed)
    keys = _distinct(n, k, 1, half, gen)
    values = _distinct(n, k, half, vocab_size, gen)
    gaps = torch.multinomial(p.expand(n, -1), k, replacement=False, generator=gen)
    positions, order = (2 * k + 2 * gaps).sort(dim=1)
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=gen)  # host: seeded CPU data
    inputs[:, 0:2 * k:2] = keys
    inputs[:, 1:2 * k:2] = values
    inputs.scatter_(1, positions, keys.gather(1, order))
    return RecallBatch(inputs, positions, values.gather(1, order))


def selective_copy(num_examples: int, *, seq_len: int, num_tokens: int, vocab_size: int,
                   seed: int) -> RecallBatch:
    """Selective copying (Gu & Dao, "Mamba", 2023, section 3.1; the layout of the Safari / H3 generator).

    Token ids: 0 is the blank (noise) token, `vocab_size - 1` the marker, data tokens are uniform in
    `[1, vocab_size - 2]` (repeats allowed). With `m = num_tokens` and `R = seq_len - m`:
    slots `0 .. R-1` are blanks with the m data tokens at a uniformly random set of slots (their order
    kept), slots `R .. seq_len-1` are m markers, and the model must output the j-th data token at the
    j-th marker: `positions[:, j] = R + j`, `targets[:, j]` = the j-th data token.
    Needs `seq_len >= 2 m` and `vocab_size >= 3`.
    """
    check_positive_int("num_examples", num_examples)
    check_positive_int("seq_len", seq_len)
    check_positive_int("num_tokens", num_tokens)
    check_positive_int("vocab_size", vocab_size, minimum=3)
    _check_seed(seed)
    if seq_len < 2 * num_tokens:
        raise ValueError(f"seq_len must be >= 2 * num_tokens = {2 * num_tokens} (a region holding the tokens, "
                         f"then one marker per token), got seq_len={seq_len}")
    n, m = num_examples, num_tokens
    region = seq_len - m
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab_size - 1, (n, m), generator=gen)  # host: seeded CPU data
    slots = _distinct(n, m, 0, region, gen).sort(dim=1).values
    inputs = torch.zeros(n, seq_len, dtype=torch.long)  # host: seeded CPU data
    inputs.scatter_(1, slots, tokens)
    inputs[:, region:] = vocab_size - 1
    positions = torch.arange(region, seq_len).expand(n, -1).clone()  # host: seeded CPU data
    return RecallBatch(inputs, positions, tokens)
