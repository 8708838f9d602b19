"""Context-parallel softmax attention (`anyattn.distributed.attention`): wall time of W gloo processes x 1
thread against 1 process x 1 thread, per-rank peak memory, bytes per rank, load balance.

B=1, H=8, D=64, fp32, causal. Cases (`anyattn bench cp_attention`; quick: tiny sizes):
- `wall N=16384 W=2`: contenders `single_1thread` (baseline: `anyattn.attention` with a causal mask in
  this process, 1 intra-op thread: SDPA's fused causal kernel), and, on 2 gloo processes x 1 thread,
  `ring_zigzag` (the target), `ulysses`, `ring_contiguous` (unbalanced, for contrast). Forward and
  forward+backward. Metrics: bytes sent per rank and op counts per algorithm (from `comm.log`).
- `memory N=32768 W=4`: metrics only. Peak resident memory (VmHWM) of forward+backward (cotangent of
  ones) for `single` (1 process) and `ring_zigzag` (4 processes, the max over ranks), each in fresh
  processes, counted from before the inputs are built (and from after: "without"); once with glibc's
  default allocator and once with a fixed mmap threshold (`bench.distributed.fixed_mmap_threshold`:
  freed blocks go back to the system, so the figure is the live memory, not heap fragmentation).
  The ratio per rank / single is the figure (target <= 0.35).
- `balance`: metrics only. Max/mean active (128 x 128) blocks per rank per ring step (worst step, and
  over the whole ring) by layout and mask at N=32768 for W = 2, 4, 8 (target: causal zig-zag W=8 <= 1.1).
"""
from __future__ import annotations

import time

import torch

from ...distributed import Layout, attention as cp_attention, shard
from ...distributed.blocks import Problem
from ...masks import Causal, Document, SlidingWindow
from ..case import Case
from ..distributed import first_call_s, peak_memory, remote, with_threads
from ..peers import attention_flops

B, H, D = 1, 8, 64
_CACHE: dict = {}


def _global(N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g) for _ in range(3)]


def rank_attention(comm, N, kind, algo, backward=False):
    """One sharded causal attention (forward, or forward+backward) on this rank; inputs cached."""
    key = (N, kind, comm.world_size, comm.rank)
    if key not in _CACHE:
        _CACHE.clear()
        lay = Layout(kind, comm.world_size, N)
        x = [shard(t, lay, comm.rank).requires_grad_() for t in _global(N)]
        _CACHE[key] = (lay, x, torch.randn(B, H, lay.n_local, D, generator=torch.Generator().manual_seed(1)))
    lay, (q, k, v), cot = _CACHE[key]
    comm.log.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.set_grad_enabled(backward):
        out = cp_attention(q, k, v, layout=lay, group=comm, mask=Causal(), algo=algo)
        if backward:
            out.backward(cot)
            q.grad = k.grad = v.grad = None
    return {"rank_s": time.perf_counter() - t0, "rank_cpu_s": time.process_time() - c0, "log": comm.log.summary()}


def _wall_case(N, W, quick):
    def make(requires_grad):
        return {n: t.requires_grad_(requires_grad) for n, t in zip("qkv", _global(N))}
    import anyattn
    contenders = {"single_1thread": with_threads(1, lambda x: anyattn.attention(x["q"], x["k"], x["v"], mask=Causal()))}
    algos = {"ring_zigzag": ("zigzag", "ring"), "ulysses": ("zigzag", "ulysses"),
             "ring_contiguous": ("contiguous", "ring")}
    for name, (kind, algo) in algos.items():
        contenders[name] = remote(W, rank_attention, N, kind, algo, name=name)

    def metrics():
        from ..distributed import last_results
        out = {}
        for name in algos:
            for bwd in (False, True):
                res = last_results.get((name, bwd))
                if res:
                    mode = "fwd+bwd" if bwd else "fwd"
                    out[f"{name} {mode} bytes sent per rank"] = max(r["log"]["bytes_sent"] for r in res)
                    out[f"{name} {mode} ops per rank"] = res[0]["log"]["ops"]
                    out[f"{name} {mode} seconds inside the ranks, wall and CPU (last call, max over ranks)"] = [
                        round(max(r["rank_s"] for r in res), 3), round(max(r["rank_cpu_s"] for r in res), 3)]
        return out

    case = Case("cp_attention", f"wall N={N} causal W={W} gloo x 1 thread vs 1 process x 1 thread",
                {"B": B, "H": H, "N": N, "D": D, "W": W, "causal": True}, attention_flops(B, H, N, N, D, D, True),
                make, contenders, baseline="single_1thread", metrics=metrics)
    case.memory_skip = {n: "the work runs in gloo worker processes: see the memory case" for n in algos}
    case.setup_seconds = {n: (lambda n=n: first_call_s.get(n)) for n in algos}  # untimed first call
    return case


def memory_rank(comm, N, kind, algo):
    """(build, run) of one forward+backward for `peak_memory`; algo "single": plain anyattn.attention."""
    import anyattn

    def build():
        if algo == "single":
            return [t.requires_grad_() for t in _global(N)], None
        lay = Layout(kind, comm.world_size, N)
        return [shard(t, lay, comm.rank).requires_grad_() for t in _global(N)], lay

    def run(inputs):
        (q, k, v), lay = inputs
        if lay is None:
            out = anyattn.attention(q, k, v, mask=Causal())
        else:
            out = cp_attention(q, k, v, layout=lay, group=comm, mask=Causal(), algo=algo)
        out.backward(torch.ones_like(out))
    return build, run


def _memory_case(N, W, quick):
    def metrics():
        out = {}
        for fixed in (False, True):
            tag = "glibc fixed mmap threshold" if fixed else "default allocator"
            warm = 2 * W * 64
            single = peak_memory(1, memory_rank, N, "zigzag", "single", warmup_args=(warm, "zigzag", "single"),
                                 fixed_threshold=fixed)[0]
            ranks = peak_memory(W, memory_rank, N, "zigzag", "ring", warmup_args=(warm, "zigzag", "ring"),
                                fixed_threshold=fixed)
            peak = {what: max(r[what] for r in ranks) for what in ("with_inputs", "without_inputs")}
            out[f"{tag}: single MiB (with inputs, without)"] = [round(single[w] / 2**20) for w in peak]
            out[f"{tag}: ring_zigzag max over ranks MiB (with inputs, without)"] = [round(peak[w] / 2**20)
                                                                                   for w in peak]
            out[f"{tag}: ratio per rank / single (with inputs, without)"] = [round(peak[w] / single[w], 3)
                                                                             for w in peak]
        return out
    return Case("cp_attention", f"memory N={N} causal W={W} fwd+bwd (peak RSS per rank vs single process)",
                {"B": B, "H": H, "N": N, "D": D, "W": W}, 1.0, lambda g: {}, {}, baseline="single",
                skip={"single": "metrics-only case"}, metrics=metrics)


def balance(kind: str, W: int, N: int, mask, tile: int = 128) -> tuple[float, float]:
    """(worst step, whole ring) max/mean over ranks of the active (tile x tile) blocks of ring attention."""
    prob = Problem(Layout(kind, W, N), mask, None, 1.0, 1, 1, 1, 4, 4, torch.device("cpu"), torch.float32)
    worst, totals = 0.0, [0] * W
    for t in range(W):
        work = [prob.active_work(r, (r - t) % W, tile) for r in range(W)]
        for r in range(W):
            totals[r] += work[r]
        if sum(work):
            worst = max(worst, max(work) * W / sum(work))
    return worst, max(totals) * W / sum(totals)


def _balance_case(N, quick):
    tile = 16 if quick else 128

    def metrics():
        masks = {"causal": Causal(), "window(N/16)": SlidingWindow(N // 16, 0),
                 "causal&documents(4)": Causal() & Document(torch.arange(N) * 4 // N)}
        out = {}
        for W in (2, 4, 8):
            for kind in ("contiguous", "zigzag", "stripe"):
                for mname, mask in masks.items():
                    step, whole = balance(kind, W, N, mask, tile)
                    out[f"W={W} {kind:<10} {mname:<20} max/mean per step, whole ring"] = [round(step, 3),
                                                                                       round(whole, 3)]
        return out
    return Case("cp_attention", f"balance N={N} ring, active {tile}x{tile} blocks per rank per step",
                {"N": N, "tile": tile}, 1.0, lambda g: {}, {}, baseline="none",
                skip={"none": "metrics-only case"}, metrics=metrics)


def cases(quick: bool):
    if quick:
        return [_wall_case(256, 2, True), _memory_case(512, 2, True), _balance_case(512, True)]
    return [_balance_case(32768, False), _wall_case(16384, 2, False), _memory_case(32768, 4, False)]


WORKLOADS = {"cp_attention": cases}
DESCRIPTIONS = {"cp_attention": "context-parallel attention: W gloo processes vs 1 process (wall time, per-rank "
                                "memory, bytes, load balance), B=1 H=8 D=64 causal"}
