"""`anyattn tune`: measure this machine's crossovers and write them to the tune cache.

Sections (each timed like the benchmarks: alternating rounds, medians; forward without gradients, or
forward+backward with a fixed cotangent; B=1, H=8, D=64 as in `anyattn bench`):
- "softmax": for N in SIZES, no mask and causal, per dtype and gradient mode, the blocked engine at each
  of BLOCK_CANDIDATES against SDPA in one alternating group: the best blocks ("blocked_blocks") and the
  faster route ("softmax_route");
- "bias": the bias benchmark cases (causal ALiBi N=8192, T5 buckets N=4096, Swin table on 64x64,
  3-D SpatialDistance N=8192): blocked (per-tile bias), lowrank_bias (when the bias is exactly low-rank
  here) and sdpa (bias materialized, when that takes at most MAX_DENSE_BYTES): "softmax_route";
- "neighborhood": the neighborhood benchmark configurations, forward: the default tile and its
  neighbours (x2, /2 per axis): "neighborhood_tile";
- "linear": gla, gated_delta_rule and kda at N=4096, chunk sizes CHUNKS: "linear_chunk".
`quick=True` runs tiny shapes (for tests): the numbers mean nothing, the file format is the same.
"""
from __future__ import annotations

import math
import platform
import sys
import time

import torch

from ..bench.timing import alternating, median
from .cache import save
from .keys import blocks_key, chunk_key, neighborhood_key, route_key

SECTIONS = ("softmax", "bias", "neighborhood", "linear")
SIZES = (1024, 4096, 16384)
GRAD_MAX_N = 4096  # forward+backward measured up to this N (the benchmark's fwd+bwd sizes)
BLOCK_CANDIDATES = ((128, 512), (256, 512), (256, 1024), (512, 512), (512, 1024))
MAX_DENSE_BYTES = 1 << 30
CHUNKS = (32, 64, 128)
B, H, D = 1, 8, 64


class _Log:
    def __init__(self, enabled):
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, msg):
        if self.enabled:
            sys.stderr.write(f"[{time.perf_counter() - self.t0:6.0f}s] {msg}\n")
            sys.stderr.flush()


def _randn(*shape, dtype, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).requires_grad_(requires_grad)


def _time(fns: dict, grad: bool, budget_s: float) -> dict:
    """Median ms per candidate; forward without gradients, or forward+backward (sum of outputs times a
    fixed random cotangent). Candidates that raise are left out."""
    cot, failed = {}, set()

    def wrap(name, fn):
        def run():
            if name in failed:
                return
            try:
                if not grad:
                    with torch.no_grad():
                        fn()
                    return
                out = fn()
                out = out[0] if isinstance(out, tuple) else out
                if name not in cot:
                    cot[name] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
                out.backward(cot[name])
            except Exception:  # noqa: BLE001 - a candidate that cannot run is not a winner
                failed.add(name)
        return run

    t = alternating({n: wrap(n, f) for n, f in fns.items()}, budget_s=budget_s, min_repeats=3, max_repeats=7)
    return {n: median(v) * 1e3 for n, v in t.items() if n not in failed}


def _record(measured: dict, value, **extra) -> dict:
    return {"value": value, "measured": {k: round(v, 3) for k, v in measured.items()}, **extra}


def _softmax(dtypes, sizes, budget_s, log, entries):
    import anyattn
    from anyattn.masks import Causal
    for dt in dtypes:
        for N in sizes:
            for causal in (False, True):
                mask = Causal() if causal else None
                for grad in (False, True):
                    if grad and N > GRAD_MAX_N:
                        continue
                    q, k, v = (_randn(B, H, N, D, dtype=dt, requires_grad=grad, seed=i) for i in range(3))
                    cands = [(bq, bk) for bq, bk in BLOCK_CANDIDATES if bq <= N and bk <= N] or [(N, N)]
                    fns = {f"blocked {bq}x{bk}": (lambda bq=bq, bk=bk: anyattn.attention(
                        q, k, v, mask=mask, method="blocked", block_q=bq, block_k=bk)) for bq, bk in cands}
                    fns["sdpa"] = lambda: anyattn.attention(q, k, v, mask=mask, method="sdpa")
                    ms = _time(fns, grad, budget_s)
                    blocked = {n: t for n, t in ms.items() if n.startswith("blocked")}
                    if blocked:
                        best = min(blocked, key=blocked.get)
                        bq, bk = (int(x) for x in best.split()[1].split("x"))
                        entries.setdefault("blocked_blocks", {})[blocks_key("cpu", dt, mask, N, N, grad)] = \
                            _record(blocked, [bq, bk])
                    routes = {"sdpa": ms["sdpa"]} if "sdpa" in ms else {}
                    if blocked:
                        routes["blocked"] = blocked[best]
                    if routes:
                        win = min(routes, key=routes.get)
                        entries.setdefault("softmax_route", {})[route_key("cpu", dt, mask, None, N, N, D, grad)] = \
                            _record(routes, win)
                        log(f"softmax {str(dt)[6:]} N={N} {'causal' if causal else 'full'} "
                            f"{'fwd+bwd' if grad else 'fwd'}: {win} ({', '.join(f'{n} {t:.1f}' for n, t in ms.items())})")


def _bias_configs(quick):
    """(label, N, causal, make_bias(dtype, requires_grad)) as in the bias benchmark cases."""
    from anyattn import biases
    from anyattn.bench.workloads.bias import swin_table
    n_alibi, n_t5, grid, n_sp = (64, 64, (8, 8), 64) if quick else (8192, 4096, (64, 64), 8192)

    # Bias tensors in the inputs' dtype, as `anyattn bench` casts every float32 input.
    def alibi(dt, rg):
        return biases.Alibi(biases.Alibi.geometric(H).slopes.to(dt).requires_grad_(rg))

    def t5(dt, rg):
        table = (0.5 * torch.randn(32, H, generator=torch.Generator().manual_seed(3))).to(dt).requires_grad_(rg)
        return biases.RelativePosition.t5(table, True, 128)

    def swin(dt, rg):
        return biases.RelativePosition.swin(swin_table(*grid, H).to(dt).requires_grad_(rg), grid)

    def spatial(dt, rg):
        g = torch.Generator().manual_seed(4)
        return biases.SpatialDistance((torch.rand(n_sp, 3, generator=g) * 4).to(dt).requires_grad_(rg),
                                      (torch.rand(H, generator=g) + 0.5).to(dt).requires_grad_(rg))

    return [("alibi", n_alibi, True, alibi), ("t5", n_t5, False, t5), ("swin", grid[0] * grid[1], False, swin),
            ("spatial", n_sp, False, spatial)]


def _bias(dtypes, budget_s, log, entries, quick):
    import anyattn
    import anyattn.softmax.lowrank_bias  # noqa: F401  (registers the method)
    from anyattn.masks import Causal
    from anyattn.registry import Request, get
    from anyattn.validate import Shape
    for label, N, causal, make in _bias_configs(quick):
        mask = Causal() if causal else None
        for dt in dtypes:
            for grad in (False, True):
                q, k, v = (_randn(B, H, N, D, dtype=dt, requires_grad=grad, seed=i) for i in range(3))
                bias = make(dt, grad)
                req = Request(q, k, v, mask, bias, D ** -0.5, Shape(B, H, H, N, N, D, D), False)
                fns = {"blocked": lambda: anyattn.attention(q, k, v, mask=mask, bias=make(dt, grad), method="blocked")}
                if get("lowrank_bias").supports(req) is None and bias.exact_rank(mask, N, N) is not None:
                    fns["lowrank_bias"] = lambda: anyattn.attention(q, k, v, mask=mask, bias=make(dt, grad),
                                                                    method="lowrank_bias")
                if H * N * N * 4 <= MAX_DENSE_BYTES and get("sdpa").supports(req) is None:
                    fns["sdpa"] = lambda: anyattn.attention(q, k, v, mask=mask, bias=make(dt, grad), method="sdpa")
                ms = _time(fns, grad, budget_s)
                if ms:
                    win = min(ms, key=ms.get)
                    entries.setdefault("softmax_route", {})[route_key("cpu", dt, mask, bias, N, N, D, grad)] = \
                        _record(ms, win)
                    log(f"bias {label} {str(dt)[6:]} N={N} {'fwd+bwd' if grad else 'fwd'}: {win} "
                        f"({', '.join(f'{n} {t:.1f}' for n, t in ms.items())})")


def _neighborhood_configs(quick):
    if quick:
        return [((64,), 9), ((8, 8), 3)]
    return [((16384,), 257), ((65536,), 257), ((128, 128), 13), ((256, 256), 13), ((16, 32, 32), (3, 7, 7)),
            ((16, 64, 64), (3, 7, 7))]


def _tile_candidates(shape, ks, ds, ss):
    from anyattn.softmax.neighborhood import MAX_TILE_QUERIES, default_tiles
    out = {default_tiles(shape, ks, ds, ss, low) for low in (False, True)}
    base = default_tiles(shape, ks, ds, ss)
    for a in range(len(shape)):
        for f in (0.5, 2):
            t = list(base)
            t[a] = max(ss[a], int(t[a] * f) // ss[a] * ss[a])
            t[a] = min(t[a], -(-(-(-shape[a] // ds[a])) // ss[a]) * ss[a])
            if math.prod(t) <= MAX_TILE_QUERIES:
                out.add(tuple(t))
    if len(shape) == 1:
        out |= {(T,) for T in (32, 64, 128) if T < shape[0] // ds[0]}
    return sorted(out)


def _neighborhood(dtypes, budget_s, log, entries, quick):
    from anyattn.softmax.neighborhood import neighborhood
    for shape, kernel in _neighborhood_configs(quick):
        m = len(shape)
        ks = kernel if isinstance(kernel, tuple) else (kernel,) * m
        ones, cs = (1,) * m, (False,) * m
        for dt in dtypes:
            q, k, v = (_randn(B, H, *shape, D, dtype=dt, requires_grad=False, seed=i) for i in range(3))
            fns = {str(list(t)): (lambda t=t: neighborhood(q, k, v, ks, tile=t)) for t in
                   _tile_candidates(shape, ks, ones, ones)}
            ms = _time(fns, False, budget_s)
            if ms:
                win = min(ms, key=ms.get)
                entries.setdefault("neighborhood_tile", {})[neighborhood_key(shape, ks, ones, ones, cs, dt, "cpu")] = \
                    _record(ms, [int(x) for x in win.strip("[]").split(",")])
                log(f"neighborhood {shape} k={kernel} {str(dt)[6:]}: tile {win} "
                    f"({', '.join(f'{n} {t:.1f}' for n, t in ms.items())})")


def _linear(dtypes, budget_s, log, entries, quick):
    import torch.nn.functional as F

    from anyattn import linear
    N = 64 if quick else 4096
    for op in ("gla", "gated_delta_rule", "kda"):
        for dt in dtypes:
            for grad in (False, True):
                g = torch.Generator().manual_seed(0)
                r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
                q, k, v = r(B, H, N, D), F.normalize(r(B, H, N, D), dim=-1), r(B, H, N, D)
                gv, gs, beta = F.logsigmoid(r(B, H, N, D) + 3), F.logsigmoid(r(B, H, N) + 3), torch.rand(B, H, N, generator=g)
                ts = [t.to(dt).requires_grad_(grad) for t in (q, k, v, gv, gs, beta)]
                q, k, v, gv, gs, beta = ts

                def call(C, op=op):
                    if op == "gla":
                        return linear.gla(q, k, v, gv, chunk_size=C)
                    if op == "gated_delta_rule":
                        return linear.gated_delta_rule(q, k, v, gs, beta, chunk_size=C)
                    return linear.kda(q, k, v, gv, beta, chunk_size=C)
                ms = _time({str(C): (lambda C=C: call(C)) for C in CHUNKS if C <= N}, grad, budget_s)
                if ms:
                    win = min(ms, key=ms.get)
                    entries.setdefault("linear_chunk", {})[chunk_key(op, "cpu", dt, N, grad)] = _record(ms, int(win))
                    log(f"linear {op} {str(dt)[6:]} N={N} {'fwd+bwd' if grad else 'fwd'}: chunk {win} "
                        f"({', '.join(f'{n} {t:.1f}' for n, t in ms.items())})")


def run(sections=SECTIONS, *, dtypes=("float32", "bfloat16"), quick: bool = False, budget_s: float = 3.0,
        path: str | None = None, progress: bool = True) -> tuple[str, dict]:
    """Measure `sections` and merge the results into the tune cache (`path`, default `cache_path()`).
    Returns `(path, entries measured)`."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"sections must be among {SECTIONS}, got {unknown}")
    dts = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
    log = _Log(progress)
    entries: dict = {}
    sizes = (64,) if quick else SIZES
    if "softmax" in sections:
        _softmax(dts, sizes, budget_s, log, entries)
    if "bias" in sections:
        _bias(dts, budget_s, log, entries, quick)
    if "neighborhood" in sections:
        _neighborhood(dts, budget_s, log, entries, quick)
    if "linear" in sections:
        _linear(dts, budget_s, log, entries, quick)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "quick": quick, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    return save({"machine": machine, "entries": entries}, path), entries
