"""The training loop of `anyattn train` and the harness around it.

`train(model, data, cfg, ...)`: AdamW (weight decay on the weight matrices of linear and embedding layers
only), linear warmup then cosine decay to 0 over `cfg.steps`, gradient clipping, a test evaluation every
`cfg.eval_every` steps (accuracy at the scored positions, or validation bits per byte), early stop at
`cfg.target`, a checkpoint at every evaluation (model, optimizer, scheduler, step, RNG states, best, history,
timers) from which `resume=True` continues bit-identically: the training batch of step s is a function of
(seed, s) alone. Throughput counts training steps only (forward, backward, optimizer; not data, evaluation
or checkpoints).

`run(task, mixers, preset, out, ...)`: for each mixer entry and each run of the preset, build the model,
train it, and record the results (`anyattn.train.report` writes them).
"""
from __future__ import annotations

import math
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mixers import build_pattern, parse_mixers, state_size
from .model import BlockModel, RecallModel
from .presets import Preset, RunConfig, preset as get_preset

_STRIDE = 1 << 30          # per-step seeds: seed * _STRIDE + step (steps < 2**30)


def _step_seed(seed: int, step: int) -> int:
    """The (even, so never a test seed) generator seed of training step `step`."""
    from .tasks import split_seed
    return split_seed(seed * _STRIDE + step, "train")


class RecallData:
    """MQAR / selective-copy batches: the training batch of step s (fresh examples from the seed of s, or a
    fixed set of `cfg.train_examples` cycled in epochs, shuffled per epoch) and a fixed test set drawn from
    the test seed. Batches are `(inputs, positions, targets)` on `device`."""

    metric = "accuracy"

    def __init__(self, cfg: RunConfig, seed: int, device="cpu"):
        from . import tasks
        if cfg.task == "mqar":
            self._make = lambda n, s: tasks.mqar(n, seq_len=cfg.seq_len, num_kv_pairs=cfg.num_kv_pairs,
                                                 vocab_size=cfg.vocab_size, seed=s)
        else:
            self._make = lambda n, s: tasks.selective_copy(n, seq_len=cfg.seq_len, num_tokens=cfg.num_tokens,
                                                           vocab_size=cfg.vocab_size, seed=s)
        self.cfg, self.seed, self.device = cfg, seed, device
        self.test = self._make(cfg.eval_examples, tasks.split_seed(seed, "test"))
        self.pool = None if cfg.train_examples is None else self._make(cfg.train_examples,
                                                                       tasks.split_seed(seed, "train"))
        self._perm = (None, None)

    def _move(self, b, rows=slice(None)):
        return tuple(t[rows].to(self.device) for t in (b.inputs, b.positions, b.targets))

    def train_batch(self, step: int):
        B = self.cfg.batch_size
        if self.pool is None:
            return self._move(self._make(B, _step_seed(self.seed, step)))
        per_epoch = max(1, self.cfg.train_examples // B)
        epoch, i = divmod(step, per_epoch)
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(_step_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.cfg.train_examples, generator=g))  # host: seeded epoch order
        return self._move(self.pool, self._perm[1][i * B:(i + 1) * B])

    def test_batches(self):
        n, B = self.cfg.eval_examples, 4 * self.cfg.batch_size
        for i in range(0, n, B):
            yield self._move(self.test, slice(i, i + B))


class LMData:
    """Byte-level language modelling on a `Corpus`: training windows at random offsets of the training bytes
    (the generator of step s seeded from (seed, s)); validation: consecutive windows over the first
    `cfg.eval_examples` validation bytes. Batches are `(inputs, None, targets)`."""

    metric = "bpb"

    def __init__(self, cfg: RunConfig, corpus, seed: int, device="cpu"):
        self.cfg, self.corpus, self.seed, self.device = cfg, corpus, seed, device
        val = torch.frombuffer(bytearray(corpus.val[:cfg.eval_examples + 1]), dtype=torch.uint8).long()
        n = (len(val) - 1) // cfg.seq_len
        if n < 1:
            raise ValueError(f"the validation split holds {len(corpus.val)} bytes, fewer than one window of "
                             f"seq_len + 1 = {cfg.seq_len + 1}")
        self.val_inputs = val[:n * cfg.seq_len].view(n, cfg.seq_len)
        self.val_targets = val[1:n * cfg.seq_len + 1].view(n, cfg.seq_len)

    def train_batch(self, step: int):
        from .corpus import lm_batch
        g = torch.Generator().manual_seed(_step_seed(self.seed, step))
        x, y = lm_batch(self.corpus.train, batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len, generator=g)
        return x.to(self.device), None, y.to(self.device)

    def test_batches(self):
        B = 4 * self.cfg.batch_size
        for i in range(0, len(self.val_inputs), B):
            yield self.val_inputs[i:i + B].to(self.device), None, self.val_targets[i:i + B].to(self.device)


def _loss(model, batch):
    inputs, positions, targets = batch
    logits = model(inputs, positions)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    return loss, logits


@torch.no_grad()
def evaluate(model, data) -> tuple[float, float]:
    """`(mean test cross-entropy in nats, metric)`: the metric is the test accuracy (fraction of scored
    positions whose argmax is the target) or the validation bits per byte."""
    was = model.training
    model.eval()
    total, right, nats = 0, 0, 0.0
    for batch in data.test_batches():
        loss, logits = _loss(model, batch)
        n = batch[2].numel()
        total += n
        nats += float(loss) * n
        right += int((logits.argmax(-1) == batch[2]).sum())
    model.train(was)
    return nats / total, (right / total if data.metric == "accuracy" else nats / total / math.log(2))


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay on the weights of `nn.Linear` and `nn.Embedding` only (not biases,
    norms, convolution kernels, SSM or gate parameters)."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over `ceil(warmup * steps)` steps, then cosine from 1 to 0 at `steps`."""
    w = math.ceil(warmup * steps)
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))


@contextmanager
def deterministic():
    """`torch.use_deterministic_algorithms(True)` (warning, not failing, on ops without a deterministic
    form), restored on exit."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def _rng_state():
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s):
    torch.set_rng_state(s["cpu"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _save(path, obj):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Progress:
    """One stderr line rewritten in place: step, loss, accuracy (or bpb), tokens/s; silent when disabled."""

    def __init__(self, label: str, steps: int, enabled: bool):
        self.label, self.steps, self.enabled, self._last = label, steps, enabled, 0.0

    def update(self, step, loss, train_metric, test_metric, tok_s, force=False):
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < 0.5):
            return
        self._last = now
        test = "" if test_metric is None else f" test {test_metric:.3f}"
        sys.stderr.write(f"\r{self.label} {step}/{self.steps} loss {loss:.3f} train {train_metric:.3f}{test} "
                         f"{tok_s:,.0f} tok/s   ")
        sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def train(model: nn.Module, data, cfg: RunConfig, *, ckpt: str | None = None, resume: bool = False,
          progress: bool = True, label: str = "") -> dict:
    """Train `model` on `data` under `cfg` (module docstring). ckpt: checkpoint file written at every
    evaluation (None: none); resume: continue from it when it exists. Returns `{"steps", "best", "final",
    "stopped_early", "tokens_per_s", "train_s", "wall_s", "history": [(step, loss, test metric)]}`; best is
    the highest accuracy or the lowest bits per byte seen at an evaluation."""
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup))
    st = {"step": 0, "best": None, "final": None, "history": [], "train_s": 0.0, "wall_s": 0.0, "tokens": 0,
          "done": False, "stopped_early": False}
    if resume and ckpt and os.path.exists(ckpt):
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        if saved["config"] != asdict(cfg):
            changed = {k: (v, asdict(cfg)[k]) for k, v in saved["config"].items() if asdict(cfg)[k] != v}
            raise ValueError(f"checkpoint {ckpt} was made with other settings (saved, now): {changed}; resume with "
                             "the same options or use another output folder")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        _set_rng_state(saved["rng"])
        st = saved["state"]
    better = (lambda a, b: a > b) if data.metric == "accuracy" else (lambda a, b: a < b)
    bar = Progress(label, cfg.steps, progress)
    t_wall = time.perf_counter()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model.train()
    with deterministic():
        while not st["done"]:
            batch = data.train_batch(st["step"])
            sync()
            t0 = time.perf_counter()
            loss, logits = _loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_v = float(loss.detach())          # synchronizes
            st["train_s"] += time.perf_counter() - t0
            st["tokens"] += batch[0].numel()
            st["step"] += 1
            step = st["step"]
            train_metric = (float((logits.argmax(-1) == batch[2]).float().mean()) if data.metric == "accuracy"
                            else loss_v / math.log(2))
            tok_s = st["tokens"] / max(st["train_s"], 1e-9)
            if step % cfg.eval_every == 0 or step >= cfg.steps:
                metric = evaluate(model, data)[1]
                st["history"].append((step, loss_v, metric))
                st["final"] = metric
                if st["best"] is None or better(metric, st["best"]):
                    st["best"] = metric
                st["stopped_early"] = cfg.target is not None and data.metric == "accuracy" and metric >= cfg.target
                st["done"] = st["stopped_early"] or step >= cfg.steps
                bar.update(step, loss_v, train_metric, metric, tok_s, force=True)
                now = time.perf_counter()
                st["wall_s"] += now - t_wall
                t_wall = now
                if ckpt:
                    _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "rng": _rng_state(), "state": st,
                                 "config": asdict(cfg)})
            else:
                bar.update(step, loss_v, train_metric, None, tok_s)
    bar.close()
    return {"steps": st["step"], "best": st["best"], "final": st["final"], "stopped_early": st["stopped_early"],
            "tokens_per_s": st["tokens"] / max(st["train_s"], 1e-9), "train_s": st["train_s"],
            "wall_s": st["wall_s"], "history": st["history"]}


def build_model(cfg: RunConfig, pattern, seed: int) -> nn.Module:
    """The model of `cfg.task` with the layers of `pattern`: `RecallModel` for mqar, `BlockModel` for copy
    and lm (`cfg.depth` copies of a single-layer pattern; a hybrid pattern as written). The embedding, the
    shared convolution and the norms are drawn from `seed` after the mixers, so they start equal for every
    mixer."""
    if cfg.task != "mqar" and len(pattern) == 1:
        pattern = tuple(pattern) * cfg.depth
    torch.manual_seed(seed + 1)
    layers = build_pattern(pattern, cfg.hidden, cfg.seq_len, cfg.task)
    torch.manual_seed(seed)
    cls = RecallModel if cfg.task == "mqar" else BlockModel
    return cls(cfg.vocab_size, cfg.hidden, layers)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def corpus_info(corpus) -> dict:
    """The corpus's provenance and its unigram / bigram bits per byte (validation, fitted on train)."""
    from .corpus import ngram_bits_per_byte
    return {"source": corpus.source, "sha256": corpus.sha256, "python_version": corpus.python_version,
            "files": corpus.files, "train_bytes": len(corpus.train), "val_bytes": len(corpus.val),
            "unigram_bpb": ngram_bits_per_byte(corpus.train, corpus.val, 1),
            "bigram_bpb": ngram_bits_per_byte(corpus.train, corpus.val, 2)}


def load_corpus(path: str | None):
    """`--corpus PATH` (any text file) or the standard-library corpus."""
    from .corpus import file_corpus, stdlib_corpus
    return stdlib_corpus() if path is None else file_corpus(path)


def run(task: str, mixers: str, preset: str | Preset, out: str, *, seed: int = 0, steps: int | None = None,
        device: str = "cpu", resume: bool = False, corpus: str | None = None, progress: bool = True,
        log=print) -> dict:
    """Train every mixer entry of `mixers` under every run of `preset` (a name or a `Preset`); checkpoints in
    `out/<mixer>[/<setting>]/ckpt.pt`. Returns `{"task", "preset", "seed", "environment", "corpus" (lm),
    "runs": [one dict per mixer and run]}`, also written (after each run) to `out/results.json`."""
    from .report import write_json
    p = preset if isinstance(preset, Preset) else get_preset(preset, task)
    if p.task != task:
        raise ValueError(f"preset {p.name!r} is for task {p.task!r}, not {task!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    entries = parse_mixers(mixers)
    dev = torch.device(device)
    os.makedirs(out, exist_ok=True)
    env = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
           "device": str(dev)}
    results = {"task": task, "preset": p.name, "seed": seed, "environment": env, "runs": []}
    text = None
    if task == "lm":
        text = load_corpus(corpus)
        results["corpus"] = info = corpus_info(text)
        log(f"corpus {info['source']}: {info['train_bytes']:,} train / {info['val_bytes']:,} validation bytes, "
            f"sha256 {info['sha256'][:16]}..., Python {info['python_version']}; unigram "
            f"{info['unigram_bpb']:.3f} bits/byte, bigram {info['bigram_bpb']:.3f} bits/byte")
    for entry, pattern in entries:
        runs = p.runs_for([s.name for s in pattern], steps)
        for cfg in runs:
            folder = os.path.join(out, _safe(entry), *([cfg.tag] if len(runs) > 1 else []))
            os.makedirs(folder, exist_ok=True)
            model = build_model(cfg, pattern, seed).to(dev)
            mixer_layers = [m for m in model.mixers]
            with torch.random.fork_rng(devices=[]):
                state = sum(state_size(m, cfg.seq_len) for m in mixer_layers)
                half = sum(state_size(m, max(1, cfg.seq_len // 2)) for m in mixer_layers)
            data = (LMData(cfg, text, seed, dev) if task == "lm" else RecallData(cfg, seed, dev))
            label = entry if len(runs) == 1 else f"{entry} {cfg.tag}"
            r = train(model, data, cfg, ckpt=os.path.join(folder, "ckpt.pt"), resume=resume, progress=progress,
                      label=label)
            row = {"task": task, "mixer": entry, "setting": cfg.tag, "group": cfg.group, "metric": data.metric,
                   "params": sum(q.numel() for q in model.parameters()), "state_size": state,
                   "state_grows": state != half, "seq_len": cfg.seq_len, "hidden": cfg.hidden, "lr": cfg.lr,
                   "batch_size": cfg.batch_size, "steps_budget": cfg.steps, "seed": seed, **env, **r}
            results["runs"].append(row)
            write_json(results, out)
            log(f"{label}: {data.metric} best {r['best']:.4f} final {r['final']:.4f} after {r['steps']} steps, "
                f"{r['tokens_per_s']:,.0f} tok/s, {r['wall_s']:.1f} s")
    return results

