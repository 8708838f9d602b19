"""Presets of `anyattn train`: `quick` (2 CPU cores, minutes per mixer) and `standard` (Zoology's published
MQAR grid, for a GPU) for each task.

A preset is a list of `RunConfig`s (one for `quick`; a grid of settings x widths x learning rates for
`standard`, whose report keeps the best learning rate of each setting and width) and a step budget per
mixer family (`Preset.runs_for`): the mixers learn MQAR at very different speeds, and the cosine schedule spans
the budget, so each family gets the budget it needs (the table is meant to be tuned).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

TASKS = ("mqar", "copy", "lm")
PRESETS = ("quick", "standard")


@dataclass(frozen=True)
class RunConfig:
    """One training run. mqar: seq_len, num_kv_pairs, vocab_size; copy: seq_len, num_tokens, vocab_size;
    lm: seq_len (bytes per window; vocab 256). hidden: model width; depth: blocks of `BlockModel` for a
    single-layer mixer (a hybrid pattern sets its own depth; MQAR's `RecallModel` is conv + mixer).
    steps: the schedule's length (`Preset.runs_for` sets it per mixer); warmup: its linear-warmup fraction;
    eval_every: steps between test evaluations (each one checkpoints); eval_examples: test-set size
    (lm: validation bytes scored); target: early-stop accuracy (None: no early stop); train_examples: a
    fixed training set of this size cycled in epochs (None: fresh examples every step)."""
    task: str
    seq_len: int
    vocab_size: int
    hidden: int
    batch_size: int
    lr: float
    steps: int
    eval_every: int
    eval_examples: int
    num_kv_pairs: int = 0
    num_tokens: int = 0
    depth: int = 2
    warmup: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    target: float | None = None
    train_examples: int | None = None

    @property
    def tag(self) -> str:
        """Short name of the setting (run folders and the report)."""
        task = {"mqar": f"kv{self.num_kv_pairs}", "copy": f"tok{self.num_tokens}", "lm": "lm"}[self.task]
        return f"L{self.seq_len}-{task}-d{self.hidden}-lr{self.lr:.1e}"

    @property
    def group(self) -> str:
        """The setting without the learning rate (the sweep reports the best run per group)."""
        return self.tag.rsplit("-lr", 1)[0]


@dataclass(frozen=True)
class Preset:
    """A named list of runs and the per-family step budgets (layer name -> steps; a run's own `steps`
    for names not in the table)."""
    name: str
    task: str
    runs: tuple[RunConfig, ...]
    steps: dict

    def runs_for(self, layer_names, steps: int | None = None) -> list[RunConfig]:
        """The runs of a pattern of layers: each with the largest budget of the pattern's layers, or `steps`
        when given."""
        out = []
        for r in self.runs:
            n = steps if steps is not None else max(self.steps.get(name, r.steps) for name in layer_names)
            out.append(replace(r, steps=n, eval_every=min(r.eval_every, n)))
        return out


# quick MQAR budgets (2 CPU cores; steps at batch 32): softmax reaches 0.99 in ~500 steps and stops early;
# gated_deltanet needed a 3000-step schedule to reach 0.9 in the prototype; the rest plateau early.
QUICK_MQAR_STEPS = {"attention": 800, "gated_deltanet": 2000, "kda": 2000, "gla": 2000, "mom": 2000,
                    "linear_attention": 2000, "longconv": 600, "s4d": 600, "mamba": 2000, "mamba2": 2000}

_QUICK = {
    "mqar": RunConfig("mqar", seq_len=256, num_kv_pairs=16, vocab_size=4096, hidden=64, batch_size=32, lr=3e-3,
                      steps=1500, eval_every=100, eval_examples=256, target=0.99),
    "copy": RunConfig("copy", seq_len=128, num_tokens=16, vocab_size=16, hidden=64, depth=2, batch_size=32,
                      lr=3e-3, steps=800, eval_every=100, eval_examples=256, target=0.99),
    "lm": RunConfig("lm", seq_len=256, vocab_size=256, hidden=128, depth=2, batch_size=16, lr=3e-3, steps=400,
                    eval_every=100, eval_examples=65536),
}

# Zoology (Arora et al., 2023) figure 2: (sequence length, pairs), widths 64-512, learning rates
# logspace(-4, -2, 4), vocabulary 8192, 100k training examples for 64 epochs, 3k test examples, weight decay
# 0.1, batch 512 / 256 / 128 by length.
_ZOOLOGY_SETTINGS = ((64, 4), (128, 8), (256, 16), (512, 64))
_ZOOLOGY_WIDTHS = (64, 128, 256, 512)
_ZOOLOGY_LRS = tuple(10 ** (-4 + 2 * i / 3) for i in range(4))
_ZOOLOGY_TRAIN, _ZOOLOGY_EPOCHS = 100_000, 64


def _zoology_batch(seq_len: int) -> int:
    return 512 if seq_len <= 128 else 256 if seq_len == 256 else 128


def _standard_mqar() -> tuple[RunConfig, ...]:
    runs = []
    for L, kv in _ZOOLOGY_SETTINGS:
        B = _zoology_batch(L)
        epoch = math.ceil(_ZOOLOGY_TRAIN / B)
        for d in _ZOOLOGY_WIDTHS:
            for lr in _ZOOLOGY_LRS:
                runs.append(RunConfig("mqar", seq_len=L, num_kv_pairs=kv, vocab_size=8192, hidden=d, batch_size=B,
                                      lr=lr, steps=epoch * _ZOOLOGY_EPOCHS, eval_every=epoch, eval_examples=3000,
                                      warmup=0.01, target=0.99, train_examples=_ZOOLOGY_TRAIN))
    return tuple(runs)


def _standard_copy() -> tuple[RunConfig, ...]:
    # Mamba's selective copying (Gu & Dao, 2023, section 4.1.1): 4096 tokens, 16 to copy, vocabulary 16,
    # two layers of width 64.
    return tuple(RunConfig("copy", seq_len=4096, num_tokens=16, vocab_size=16, hidden=64, depth=2, batch_size=64,
                           lr=lr, steps=20_000, eval_every=1000, eval_examples=1024, target=0.99)
                 for lr in (3e-4, 1e-3, 3e-3))


def _standard_lm() -> tuple[RunConfig, ...]:
    return tuple(RunConfig("lm", seq_len=1024, vocab_size=256, hidden=512, depth=8, batch_size=32, lr=lr,
                           steps=20_000, eval_every=1000, eval_examples=1 << 20, warmup=0.02)
                 for lr in (3e-4, 1e-3, 3e-3))


def preset(name: str, task: str) -> Preset:
    """The preset `name` ("quick" | "standard") of `task` ("mqar" | "copy" | "lm")."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    if name == "quick":
        run = _QUICK[task]
        steps = QUICK_MQAR_STEPS if task == "mqar" else {}
        return Preset(name, task, (run,), steps)
    runs = {"mqar": _standard_mqar, "copy": _standard_copy, "lm": _standard_lm}[task]()
    return Preset(name, task, runs, {})
