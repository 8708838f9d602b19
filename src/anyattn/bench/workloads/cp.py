"""Context parallelism (`anyattn.distributed`): the attention cases of `cp_attention`, then the linear family.

Linear cases (B=1, H=8, D=64, fp32, contiguous layout; quick: tiny sizes):
- `wall gated_delta_rule N=65536 W=2` (the target: algo="auto" >= 1.6x) and `wall gla N=65536 W=2`:
  contenders `single_1thread` (baseline: the single-process op in this process, 1 intra-op thread) and,
  on 2 gloo processes x 1 thread, `auto`, `summary`, `ulysses`, `pipeline`. Forward and forward+backward.
  Metrics: the algorithm "auto" picked and the cost model's estimates (this machine's constants), the
  bytes sent per rank per algorithm from `comm.log`, each rank's own time.
- `memory gated_delta_rule N=65536 W=2`: metrics only; peak resident memory of forward+backward per rank
  (max over ranks) for each algorithm against the single process, each in fresh processes.
- `bytes`: metrics only; bytes sent per rank per algorithm measured from the log (thread ranks, W=4) at two
  N (the summary's do not grow with N), and the formula table (`cost.bytes_per_rank`) for W = 2..64.
- `projection`: metrics only; the cost model's time per layer per rank for W = 8..64 over NVLink, PCIe and
  InfiniBand (constants and their sources in docs/distributed.md), forward+backward, N = 2^20 tokens;
  writes `cp_projection.png` into the bench output folder.
"""
from __future__ import annotations

import os
import time

import torch

from ... import linear as L
from ...distributed import Layout, cost, explain_linear, linear as cp_linear, shard
from ...distributed.testing import run_threads
from ..case import Case
from ..distributed import last_results, peak_memory, remote, with_threads
from .cp_attention import cases as attention_cases
from .linear_family import _decay_flops, _delta_flops, _inputs

B, H, D = 1, 8, 64
ALGOS = ("auto", "summary", "ulysses", "pipeline")
OPS = {"gdn": ("gated_delta_rule", ("q", "k", "v", "g", "beta")), "gla": ("gla", ("q", "k", "v", "g"))}
_CACHE: dict = {}


def _local(kind, N, comm, requires_grad):
    """This rank's inputs, built once per (op, N, W) and kept (building them is not timed)."""
    key = (kind, N, comm.world_size, comm.rank)
    if key not in _CACHE:
        _CACHE.clear()
        lay = Layout("contiguous", comm.world_size, N)
        x = _inputs(kind, N, False)
        _CACHE[key] = (lay, [shard(x[n], lay, comm.rank) for n in OPS[kind][1]])
    lay, args = _CACHE[key]
    for a in args:
        a.requires_grad_(requires_grad)
    return lay, args


def rank_linear(comm, kind, N, algo, backward=False):
    """One context-parallel forward (and backward) of the op on this rank; returns its time and byte log."""
    lay, args = _local(kind, N, comm, backward)
    comm.log.reset()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        o = cp_linear(OPS[kind][0], *args, layout=lay, group=comm, algo=algo)
        if backward:
            o.backward(torch.ones_like(o))
            for a in args:
                a.grad = None
    return {"rank_s": time.perf_counter() - t0, "log": comm.log.summary()}


def _explain(comm, kind, N, backward):
    lay, args = _local(kind, N, comm, backward)
    e = explain_linear(OPS[kind][0], *args, layout=lay, group=comm, backward=backward)
    return {"algo": e["algo"], "estimates": {k: round(v, 4) for k, v in e["estimates"].items()}}


def _wall_case(kind, N, W):
    op, names = OPS[kind]
    fn = getattr(L, op)
    contenders = {"single_1thread": with_threads(1, lambda x: fn(*(x[n] for n in names)))}
    for algo in ALGOS:
        contenders[algo] = remote(W, rank_linear, kind, N, algo, name=f"{kind}-{algo}")

    def metrics():
        out = {}
        for bwd in (False, True):
            mode = "fwd+bwd" if bwd else "fwd"
            e = run_threads(W, _explain, kind, N, bwd)[0]
            out[f"auto picks ({mode})"] = e["algo"]
            out[f"cost model estimates s per rank ({mode})"] = e["estimates"]
            for algo in ALGOS:
                res = last_results.get((f"{kind}-{algo}", bwd))
                if res:
                    out[f"{algo} {mode}: bytes sent per rank, rank seconds"] = [
                        max(r["log"]["bytes_sent"] for r in res), [round(r["rank_s"], 3) for r in res]]
        return out

    flops = (_delta_flops(N) if kind == "gdn" else _decay_flops(N))
    case = Case("cp", f"wall {op} N={N} W={W} gloo x 1 thread vs 1 process x 1 thread",
                {"B": B, "H": H, "N": N, "D": D, "W": W, "op": op}, flops,
                lambda rg: _inputs(kind, N, rg), contenders, baseline="single_1thread", metrics=metrics)
    case.memory_skip = {a: "the work runs in gloo worker processes: see the memory case" for a in ALGOS}
    case.setup_seconds = {n: 0.0 for n in contenders}   # one untimed call each first (inputs, pools, page faults)
    return case


def memory_rank(comm, kind, N, algo):
    """(build, run) of one forward+backward for `peak_memory`; algo "single": the single-process op."""
    op, names = OPS[kind]

    def build():
        if algo == "single":
            x = _inputs(kind, N, True)
            return [x[n] for n in names], None
        lay = Layout("contiguous", comm.world_size, N)
        x = _inputs(kind, N, False)
        return [shard(x[n], lay, comm.rank).requires_grad_() for n in names], lay

    def run(inputs):
        args, lay = inputs
        o = getattr(L, op)(*args) if lay is None else cp_linear(op, *args, layout=lay, group=comm, algo=algo)
        o.backward(torch.ones_like(o))
    return build, run


def _memory_case(kind, N, W):
    def metrics():
        warm = 1024
        single = peak_memory(1, memory_rank, kind, N, "single", warmup_args=(kind, warm, "single"))[0]
        out = {"single MiB (with inputs / without)": [round(single["with_inputs"] / 2**20),
                                                      round(single["without_inputs"] / 2**20)]}
        for algo in ("summary", "ulysses", "pipeline"):
            ranks = peak_memory(W, memory_rank, kind, N, algo, warmup_args=(kind, warm, algo))
            peak = {w: max(r[w] for r in ranks) for w in ("with_inputs", "without_inputs")}
            out[f"{algo} per rank MiB (with / without), ratio to single"] = [
                round(peak["with_inputs"] / 2**20), round(peak["without_inputs"] / 2**20),
                round(peak["with_inputs"] / single["with_inputs"], 3)]
        return out
    return Case("cp", f"memory {OPS[kind][0]} N={N} W={W} fwd+bwd (peak RSS per rank vs single process)",
                {"B": B, "H": H, "N": N, "D": D, "W": W}, 1.0, lambda g: {}, {}, baseline="single",
                skip={"single": "metrics-only case"}, metrics=metrics)


def _bytes_rank(comm, kind, N, algo):
    lay, args = _local(kind, N, comm, True)
    comm.log.reset()
    o = cp_linear(OPS[kind][0], *args, layout=lay, group=comm, algo=algo)
    fwd = comm.log.bytes_sent
    o.backward(torch.ones_like(o))
    return fwd, comm.log.bytes_sent - fwd


def _bytes_case(quick):
    Ns = (256, 1024) if quick else (4096, 16384)
    W = 4

    def metrics():
        out = {}
        for kind in OPS:
            for algo in ("summary", "ulysses", "pipeline"):
                got = [max(run_threads(W, _bytes_rank, kind, N, algo), key=sum) for N in Ns]
                out[f"{OPS[kind][0]} {algo} W={W}: bytes sent per rank (fwd, bwd) at N={Ns}"] = got
        for kind, fam in (("gdn", "delta"), ("gla", "decay")):
            rows = {}
            for W_ in (2, 4, 8, 16, 32, 64):
                p = cost.lm_profile(fam, 65536 // W_, B, H, D)
                rows[W_] = {a: cost.bytes_per_rank(p, W_, a) for a in ("summary", "ulysses", "pipeline")}
            out[f"{OPS[kind][0]} formula: bytes sent per rank per forward, N=65536, fp32"] = rows
        return out
    return Case("cp", f"bytes per rank: measured (W=4, N={Ns}) and formulas (W=2..64)", {"B": B, "H": H, "D": D},
                1.0, lambda g: {}, {}, baseline="none", skip={"none": "metrics-only case"}, metrics=metrics)


def _projection_case():
    def metrics():
        rows = cost.projection()
        out = {f"{r['link']} W={r['W']}": {k: (round(v * 1e3, 3) if isinstance(v, float) else v)
                                          for k, v in r.items() if k not in ("link", "W")} for r in rows}
        path = cost.plot_projection(rows, os.path.join(os.environ.get("ANYATTN_BENCH_OUT", "bench-out"),
                                                       "cp_projection.png"))
        out["plot"] = path or "matplotlib missing: no plot"
        out["units"] = "ms per layer per rank, forward+backward, gated_delta_rule N=2^20 B=1 H=8 D=64 bf16"
        return out
    return Case("cp", "projection: cost model, W = 8..64 over NVLink / PCIe / InfiniBand", {}, 1.0,
                lambda g: {}, {}, baseline="none", skip={"none": "metrics-only case"}, metrics=metrics)


def linear_cases(quick: bool):
    if quick:
        return [_wall_case("gdn", 512, 2), _bytes_case(True), _projection_case()]
    return [_wall_case("gdn", 65536, 2), _wall_case("gla", 65536, 2), _memory_case("gdn", 65536, 2),
            _bytes_case(False), _projection_case()]


def cases(quick: bool):
    return attention_cases(quick) + linear_cases(quick)


def _only_linear(quick: bool):
    return linear_cases(quick)


WORKLOADS = {"cp": cases, "cp_linear": _only_linear}
DESCRIPTIONS = {"cp": "context parallelism: attention (cp_attention's cases) and the linear family (wall time of "
                      "2 gloo processes vs 1, per algorithm; memory; bytes; projection to 8-64 GPUs)",
                "cp_linear": "the linear-family cases of `cp` only"}
