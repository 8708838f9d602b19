"""Run workloads: time contenders alternating in one process, measure errors, memory and throughput."""
from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
import sys
import time

import torch

from .case import Case, first_tensor
from .memory import measure as measure_memory
from .roofline import matmul_gflops
from .timing import alternating, median
from .workloads import get_cases


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled, self.t0 = max(total, 1), 0, enabled, time.perf_counter()

    def step(self, what: str):
        self.done += 1
        if self.enabled:
            frac = self.done / self.total
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.0f}s  {what[:60]:<60}")
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\n")


def _rel_errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.detach().double(), ref.detach().double()
    fro = float((out - ref).norm() / ref.norm().clamp_min(1e-300))
    out, ref = out.reshape(-1, out.shape[-1] if out.dim() else 1), ref.reshape(-1, ref.shape[-1] if ref.dim() else 1)
    rows = (out - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-300)
    return {"rel_fro": fro, "rel_max_row": float(rows.max())}


def _setup_value(v):
    v = v() if callable(v) else v
    return float(v) if isinstance(v, (int, float)) else None


def run_case(case: Case, index: int, *, quick: bool, memory: bool, budget_s: float, roofline: float,
             progress: Progress, memory_max_s: float = 20.0) -> dict:
    names = list(case.contenders)
    failed: dict[str, str] = {}
    res = {"workload": case.workload, "label": case.label, "params": case.params, "baseline": case.baseline,
           "flops_forward": case.flops, "contenders": {}, "skip": dict(case.skip), "missing": dict(case.missing),
           "forward_only": dict(case.forward_only), "failed": failed}
    x = case.make_inputs(False)
    outs = {}

    def guard(n, f):
        """A contender that raises is reported as failed, not allowed to abort the whole run."""
        def g():
            if n not in failed:
                try:
                    f()
                except Exception as e:  # noqa: BLE001 - any failure of a peer is reported
                    failed[n] = f"{type(e).__name__}: {str(e)[:300]}"
        return g

    with torch.no_grad():
        def capture(n):
            def g():
                outs[n] = first_tensor(case.contenders[n](x))
            return guard(n, g)
        for n in names:
            if n in case.setup_seconds:
                capture(n)()  # warm-up call: compile etc.
        times_f = alternating({n: capture(n) for n in names}, budget_s=budget_s) if names else {}
    names = [n for n in names if n not in failed]
    progress.step(f"{case.workload} {case.label} forward")
    for n in names:
        r = {"forward_s": median(times_f[n]), "forward_repeats": len(times_f[n])}
        if n in case.setup_seconds:
            r["setup_s"] = _setup_value(case.setup_seconds[n])
        if case.exact and case.exact in outs and n in outs:
            if outs[n].shape == outs[case.exact].shape:
                r.update(_rel_errors(outs[n], outs[case.exact]))
            else:
                r["error_note"] = f"no error: output shape {tuple(outs[n].shape)} differs from the exact one"
        res["contenders"][n] = r
    if case.backward:
        bnames = [n for n in names if n not in case.forward_only]
        xg = case.make_inputs(True)
        leaves = [t for t in xg.values() if isinstance(t, torch.Tensor) and t.requires_grad]
        cot = {}

        def fb(n):
            def g():
                out = first_tensor(case.contenders[n](xg))
                if n not in cot:
                    cot[n] = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out)
                out.backward(cot[n])
                for t in leaves:
                    t.grad = None
            return guard(n, g)
        if bnames:
            times_b = alternating({n: fb(n) for n in bnames}, budget_s=budget_s)
            for n in bnames:
                if n in failed:
                    res["contenders"][n]["fwd_bwd_note"] = "backward failed: " + failed.pop(n)
                    continue
                res["contenders"][n]["fwd_bwd_s"] = median(times_b[n])
                res["contenders"][n]["fwd_bwd_repeats"] = len(times_b[n])
        progress.step(f"{case.workload} {case.label} forward+backward")
    if case.metrics is not None:
        try:
            res["metrics"] = case.metrics()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res["metrics"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    base = res["contenders"].get(case.baseline, {})
    fb_flops = case.flops_backward if case.flops_backward is not None else 2.5 * case.flops
    for n, r in res["contenders"].items():
        if base.get("forward_s"):
            r["speedup_forward"] = base["forward_s"] / r["forward_s"]
        if base.get("fwd_bwd_s") and r.get("fwd_bwd_s"):
            r["speedup_fwd_bwd"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
        r["gflops_forward"] = case.flops / r["forward_s"] / 1e9
        r["roofline_frac_forward"] = r["gflops_forward"] / roofline if roofline else None
        if r.get("fwd_bwd_s"):
            r["gflops_fwd_bwd"] = (case.flops + fb_flops) / r["fwd_bwd_s"] / 1e9
    if memory:
        jobs = {}
        for n in names:
            r = res["contenders"][n]
            bwd = case.backward and n not in case.forward_only
            est = r.get("forward_s", 0) + (r.get("fwd_bwd_s", 0) if bwd else 0) + (r.get("setup_s") or 0)
            if n in case.memory_skip:
                r["peak_bytes_forward_note"] = f"not measured here: {case.memory_skip[n]}"
            elif est > memory_max_s:
                r["peak_bytes_forward_note"] = f"not measured: one run takes {est:.0f} s"
            else:
                jobs[n] = bwd
        # Peak memory is per process (VmHWM), so two children may run at once; timing is already done.
        with ThreadPoolExecutor(max_workers=2) as pool:
            found = dict(zip(jobs, pool.map(lambda nb: measure_memory(case.workload, index, nb[0], quick, nb[1]),
                                            jobs.items())))
        for n, m in found.items():
            r = res["contenders"][n]
            r["peak_bytes_forward"] = m.get("forward_bytes")
            if jobs[n]:
                r["peak_bytes_fwd_bwd"] = m.get("fwd_bwd_bytes")
            if "error" in m:
                r["peak_bytes_forward_note"] = m["error"]
        progress.step(f"{case.workload} {case.label} memory")
    return res


def run(workloads: list[str], *, quick: bool = False, memory: bool = True, budget_s: float = 6.0,
        progress: bool = True, memory_max_s: float = 20.0) -> dict:
    """Run the named workloads; returns the JSON-able results. `budget_s`: timing seconds per case
    and mode (sets the repeats); `memory_max_s`: contenders whose one run takes longer are not re-run
    for the memory measurement (reported as such)."""
    roof = matmul_gflops()
    all_cases = [(w, i, c) for w in workloads for i, c in enumerate(get_cases(w, quick))]
    steps = sum(1 + int(c.backward) + int(memory) for _, _, c in all_cases)
    bar = Progress(steps, progress)
    results = []
    for w, i, c in all_cases:
        results.append(run_case(c, i, quick=quick, memory=memory, budget_s=budget_s, roofline=roof, progress=bar,
                                memory_max_s=memory_max_s))
    bar.close()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "matmul_gflops_fp32": roof},
        "quick": quick, "workloads": workloads, "cases": results,
    }

