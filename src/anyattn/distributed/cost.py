"""The cost model behind `algo="auto"` of `ad.linear` / `ad.ssd` / `ad.selective_scan`, and its
projection to W = 8..64 devices (docs/distributed.md).

Per rank, for n = N / W local tokens (forward; training multiplies compute by `1 + backward_ratio`
and traffic by 2):

    run(t, f, c)  = f * c * flops(t) / flop_rate  +  steps(t) * step_overhead
    summary       = run(n, 1, c_summary)                       + allgather(W - 1 maps)
    ulysses       = run(W n, 1 / W, 1)                          + all_to_all(inputs) + all_to_all(outputs)
    pipeline(P)   = (P + W - 1) * run(n, 1 / P, 1)             + 2 (P + W) * latency       (best P <= 8)
    pipeline(P)   = prepare(n) + (P + W - 1) * scan(n / P)     + 2 (P + W) * latency       (delta rules: phased)
    all_to_all(b) = (W - 1) * latency + (W - 1) / W * b / bandwidth + 2 b / copy_bandwidth
    allgather(b)  = (W - 1) * (latency + b / bandwidth)

flops(t): the chunk algorithm's useful FLOPs for t tokens and all heads (C = 64; per token and
head: decay `2 C (K + V) + 4 K V`, delta `4 C K + C (K + V) + 2 C V + 6 K V`, MoM: delta times the
memories, selective scan `12 N` elementwise per channel, weighted by `scan_weight`); steps(t): Python
/ kernel-launch steps of the engine (`t / 256 * 25 + 3 t / 64` for the delta engine, `t / 1024 * 12 +
t / 64` for decay, per call) — the part that does not shrink with fewer heads, so Ulysses (W times
the steps) and small pipeline blocks pay it more. c_summary: the summary's compute factor (decay
1 + one `K x V` read per token; delta: the run with `D_k` extra value columns; MoM: that plus a
rerun; scan: two scans). Ulysses needs every head count divisible by W; the pipeline the
contiguous layout; the summary at most two runs per rank (contiguous, zigzag).

`MACHINES` holds the constants: "cpu" (this project's 2-core CPU, gloo over loopback, 1 thread per
rank; measured by the `cp` bench workload) and, for the projection, GPU links (see
docs/distributed.md for the sources).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

C = 64
MAX_PARTS = 8          # the pipeline's blocks (algorithms.pipeline's `parts`)
PREPARE_SHARE = 0.6    # delta rules: share of the chunk engine's FLOPs that do not need the state (measured ~0.6)
HOISTED = 1.35         # the phased pipeline's first phase over the whole shard at once is memory-bound (measured)


@dataclass(frozen=True)
class Machine:
    """flop_rate (FLOP/s of the engine per rank), step_overhead (s per engine step), bandwidth (bytes/s
    a rank moves each way), latency (s per message), copy_bandwidth (bytes/s of a local copy),
    backward_ratio (backward time / forward time of the engines), bytes_per_element (of the exchanged
    tensors), scan_weight (cost of a selective-scan FLOP in matmul FLOPs)."""

    name: str
    flop_rate: float
    step_overhead: float
    bandwidth: float
    latency: float
    copy_bandwidth: float
    backward_ratio: float = 2.5
    bytes_per_element: int = 4
    scan_weight: float = 8.0


MACHINES = {
    # 2-core CPU, 1 thread per rank, gloo over loopback (bench `cp` measures these).
    "cpu": Machine("cpu", flop_rate=3.0e10, step_overhead=8e-6, bandwidth=3e9, latency=1e-4,
                   copy_bandwidth=1e10, backward_ratio=3.0),
    # GPUs (the projection): H100 SXM with fused chunk kernels (sequential chunk steps inside a kernel, ~20 ns
    # each), an assumed effective 150 TFLOP/s (about 15% of the 989 TFLOP/s bf16 dense peak), bf16 traffic.
    # Links per GPU and direction: NVLink 4 450 GB/s, PCIe 5.0 x16 64 GB/s, InfiniBand NDR 50 GB/s; latency of
    # a small NCCL collective step 10 / 15 / 20 us (docs/distributed.md has the sources).
    "nvlink": Machine("nvlink", flop_rate=1.5e14, step_overhead=2e-8, bandwidth=4.5e11, latency=1e-5,
                      copy_bandwidth=2.0e12, bytes_per_element=2),
    "pcie": Machine("pcie", flop_rate=1.5e14, step_overhead=2e-8, bandwidth=6.4e10, latency=1.5e-5,
                    copy_bandwidth=2.0e12, bytes_per_element=2),
    "infiniband": Machine("infiniband", flop_rate=1.5e14, step_overhead=2e-8, bandwidth=5.0e10, latency=2e-5,
                          copy_bandwidth=2.0e12, bytes_per_element=2),
}


@dataclass(frozen=True)
class Profile:
    """What the model needs of a call: family ("decay", "delta", "mom", "scan"), batch B, state heads
    H (channels for the scan), query heads Hq, K (state rows; N for the scan), V, memories M (MoM),
    n (local tokens), in_elems / out_elems (elements per token of the per-token inputs / outputs),
    map_elems (elements of one packed affine map), divisible (head counts split by W), runs (per rank)."""

    family: str
    B: int
    H: int
    Hq: int
    K: int
    V: int
    n: int
    in_elems: int
    out_elems: int
    map_elems: int
    M: int = 1
    state_elems: int = 0


def profile(problem, n: int | None = None) -> Profile:
    """The `Profile` of a `problems.Problem` (its local token count, or `n`)."""
    from .problems import LinearProblem, MoMProblem
    a = problem.values()
    length = problem.length(a)
    n = length if n is None else n
    in_elems = sum(x.value.numel() // length for x in problem.args.values() if x.seq is not None)
    shape = problem.state_shape(a)
    kind, mshape = problem.map_shape(a)
    state = math.prod(shape)
    map_elems = state + (0 if mshape is None else math.prod(mshape))
    if isinstance(problem, LinearProblem):
        q, v = a["q"], a["v"]
        fam = "delta" if problem.delta else "decay"
        return Profile(fam, shape[0], shape[1], q.shape[1], shape[2], shape[3], n, in_elems,
                       q.shape[1] * v.shape[-1] * q.shape[0], map_elems, state_elems=state)
    if isinstance(problem, MoMProblem):
        return Profile("mom", shape[0], shape[1], shape[1], shape[3], shape[4], n, in_elems,
                       shape[0] * shape[1] * shape[4], map_elems, M=shape[2], state_elems=state)
    return Profile("scan", shape[0], shape[1], shape[1], shape[2], 1, n, in_elems, shape[0] * shape[1], map_elems,
                   state_elems=state)


def lm_profile(family: str, n: int, B: int = 1, H: int = 8, D: int = 64) -> Profile:
    """The profile of a layer's mixer call without tensors: q, k, v `(B, H, n, D)` with the gates of the
    family ("decay": a scalar log-decay per token, as retention / Mamba-2; "delta": Gated DeltaNet)."""
    state = B * H * D * D
    if family == "delta":
        return Profile("delta", B, H, H, D, D, n, B * H * (3 * D + 2), B * H * D, state + B * H * D * D,
                       state_elems=state)
    return Profile("decay", B, H, H, D, D, n, B * H * (3 * D + 1), B * H * D, state + B * H, state_elems=state)


def bytes_per_rank(p: Profile, W: int, algo: str, element_size: int = 4) -> int:
    """Bytes one rank sends in one forward (the most over ranks; backward sends as much again) on the
    contiguous layout, without initial or final state: summary `(W - 1) map`, Ulysses `(W - 1) / W n
    (inputs + outputs)`, pipeline one state."""
    if W == 1:
        return 0
    if algo == "summary":
        return (W - 1) * p.map_elems * element_size
    if algo == "ulysses":
        return (W - 1) * p.n * (p.in_elems + p.out_elems) * element_size // W
    if algo == "pipeline":
        return p.state_elems * element_size
    raise ValueError(f"algo must be 'summary', 'ulysses' or 'pipeline', got {algo!r}")


def _flops_per_token(p: Profile, V: int | None = None) -> float:
    K, V = p.K, (p.V if V is None else V)
    if p.family == "decay":
        return p.B * p.Hq * (2 * C * (K + V) + 4 * K * V)
    if p.family in ("delta", "mom"):
        return p.B * p.Hq * p.M * (4 * C * K + C * (K + V) + 2 * C * V + 6 * K * V)
    return p.B * p.H * 12 * K


def _steps(p: Profile, t: float) -> float:
    if p.family in ("delta", "mom"):
        return p.M * (t / 256 * 25 + 3 * t / 64)
    if p.family == "decay":
        return t / 1024 * 12 + t / 64
    return max(1.0, t * p.B * p.H * p.K / (1 << 20)) * 20


def _run(p: Profile, m: Machine, t: float, frac: float, factor: float = 1.0) -> float:
    weight = m.scan_weight if p.family == "scan" else 1.0
    return frac * factor * weight * t * _flops_per_token(p) / m.flop_rate + _steps(p, t) * m.step_overhead


def _summary_factor(p: Profile) -> float:
    read = 2 * p.B * p.Hq * p.K * p.V
    if p.family == "decay":          # the read `qt S_in` is one big matmul: about twice the engine's FLOP rate
        return 1.0 + 0.5 * read / _flops_per_token(p)
    if p.family == "delta":
        return (_flops_per_token(p, p.V + p.K) + read) / _flops_per_token(p)
    if p.family == "mom":
        return 1.0 + _flops_per_token(p, p.V + p.K) / _flops_per_token(p)
    return 2.0


def _a2a(m: Machine, W: int, elems: float) -> float:
    b = elems * m.bytes_per_element
    return (W - 1) * m.latency + (W - 1) / W * b / m.bandwidth + 2 * b / m.copy_bandwidth


def estimate(p: Profile, W: int, layout_kind: str = "contiguous", machine: str | Machine = "cpu",
             backward: bool = False, runs_per_rank: int | None = None) -> dict:
    """Seconds per rank of each algorithm ("summary", "ulysses", "pipeline"; absent where it does not
    apply), plus "pipeline_parts" (the best P). `p.n` is the local token count."""
    m = MACHINES[machine] if isinstance(machine, str) else machine
    cb = 1.0 + (m.backward_ratio if backward else 0.0)
    tb = 2.0 if backward else 1.0
    n = p.n
    runs_ = runs_per_rank if runs_per_rank is not None else {"contiguous": 1, "zigzag": 2}.get(layout_kind, n)
    out = {}
    if W == 1:
        return {"summary": cb * _run(p, m, n, 1.0)}
    if runs_ <= 2:
        comp = cb * (_run(p, m, n, 1.0, _summary_factor(p)) + (runs_ - 1) * _steps(p, n) * m.step_overhead)
        out["summary"] = comp + tb * (W - 1) * (m.latency + runs_ * p.map_elems * m.bytes_per_element / m.bandwidth)
    if p.H % W == 0 and p.Hq % W == 0:
        out["ulysses"] = cb * _run(p, m, W * n, 1.0 / W) + tb * (_a2a(m, W, n * p.in_elems) +
                                                                    _a2a(m, W, n * p.out_elems))
    if layout_kind == "contiguous":
        units = p.B * p.H
        best = None
        for P in range(1, min(units, MAX_PARTS) + 1):
            if units % P:
                continue
            if p.family == "delta":       # phased: the state-independent part first, all heads at once
                flops = n * _flops_per_token(p) / m.flop_rate
                prep = HOISTED * PREPARE_SHARE * flops + n / 256 * 22 * m.step_overhead
                scan = (1 - PREPARE_SHARE) * flops / P + (3 * n / 64 + 3 * n / 256) * m.step_overhead
                t = cb * (prep + (P + W - 1) * scan)
            else:
                t = (P + W - 1) * cb * _run(p, m, n, 1.0 / P)
            t += tb * 2 * (P + W) * m.latency
            if best is None or t < best[0]:
                best = (t, P)
        out["pipeline"], out["pipeline_parts"] = best
    return out


def choose(problem, layout, W: int, machine: str | Machine | None = None, backward: bool | None = None) -> str:
    """The algorithm with the lowest `estimate` for `problem` on this rank's layout."""
    import torch
    from .algorithms import check_heads
    from .state import runs
    if backward is None:
        backward = torch.is_grad_enabled() and any(a.value.requires_grad for a in problem.args.values())
    p = profile(problem)
    est = estimate(p, W, layout.kind, machine or default_machine(problem), backward, len(runs(layout, 0)))
    if check_heads(problem, W) is not None:
        est.pop("ulysses", None)
    cands = {k: v for k, v in est.items() if k in ("summary", "ulysses", "pipeline")}
    if not cands:
        raise ValueError(f"no context-parallel algorithm applies to this call on the {layout.kind!r} layout with "
                         f"W = {W}: use a contiguous or zigzag layout, or head counts divisible by W")
    return min(cands, key=cands.get)


def pipeline_parts(problem, layout, W: int, machine: str | Machine | None = None, backward: bool | None = None) -> int:
    """The pipeline's number of blocks P with the lowest estimate (1..MAX_PARTS, dividing B x heads)."""
    import torch
    if layout.kind != "contiguous":
        return 1
    if backward is None:
        backward = torch.is_grad_enabled() and any(a.value.requires_grad for a in problem.args.values())
    est = estimate(profile(problem), W, "contiguous", machine or default_machine(problem), backward)
    return est["pipeline_parts"]


def default_machine(problem) -> Machine:
    dev = next(iter(problem.args.values())).value.device
    return MACHINES["cpu"] if dev.type == "cpu" else MACHINES["nvlink"]


def projection(family: str = "delta", N: int = 1 << 20, B: int = 1, H: int = 8, D: int = 64,
               worlds=(8, 16, 32, 64), links=("nvlink", "pcie", "infiniband"), backward: bool = True) -> list:
    """Rows `{link, W, summary, ulysses, pipeline, pipeline_parts, best}` (seconds per rank per layer) for a
    global sequence of N tokens over W devices."""
    rows = []
    for link in links:
        for W in worlds:
            est = estimate(lm_profile(family, N // W, B, H, D), W, "contiguous", link, backward)
            algos = {k: v for k, v in est.items() if k in ("summary", "ulysses", "pipeline")}
            rows.append({"link": link, "W": W, **est, "best": min(algos, key=algos.get)})
    return rows


def plot_projection(rows, path: str) -> str | None:
    """Time per rank against W, one panel per link, one line per algorithm; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import os
    links = list(dict.fromkeys(r["link"] for r in rows))
    fig, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.6), squeeze=False, sharey=True)
    for ax, link in zip(axes[0], links):
        sub = [r for r in rows if r["link"] == link]
        for algo in ("summary", "ulysses", "pipeline"):
            pts = [(r["W"], r[algo] * 1e3) for r in sub if algo in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=algo)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("W (devices)")
        ax.set_title(link)
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("ms per layer per rank (fwd+bwd)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Gated DeltaNet layer, N = 2^20 tokens, B=1 H=8 D=64 bf16: cost-model projection", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def with_overrides(machine: str | Machine, **kw) -> Machine:
    """A copy of a machine with some constants replaced (e.g. a measured bandwidth)."""
    m = MACHINES[machine] if isinstance(machine, str) else machine
    return replace(m, **kw)
