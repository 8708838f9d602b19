"""Run workloads: time contenders alternating in one process, measure errors, memory and throughput."""
from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
import sys
import time

import torch

from .case import Case, cast_inputs, first_tensor
from .device import bench_device, on_device
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


def _guard(failed, n, f):
    """A contender that raises is reported as failed, not allowed to abort the whole run."""
    def g():
        if n not in failed:
            try:
                f()
            except Exception as e:  # noqa: BLE001 - any failure of a peer is reported
                failed[n] = f"{type(e).__name__}: {str(e)[:300]}"
    return g


def _time_modes(case: Case, names: list, make, budget_s: float, progress: Progress, tag: str, failed: dict):
    """Time `names` forward (no grad) and, when the case asks for it, forward+backward, alternating, on
    inputs from `make(requires_grad)`. Returns `(per-contender results, forward outputs, inputs)`."""
    x = on_device(make(False))
    dev = bench_device().type
    outs, res = {}, {}

    with torch.no_grad():
        def capture(n):
            def g():
                outs[n] = first_tensor(case.contenders[n](x))
            return _guard(failed, n, g)
        for n in names:
            if n in case.setup_seconds:
                capture(n)()  # warm-up call: compile etc.
        times_f = alternating({n: capture(n) for n in names}, budget_s=budget_s, device_type=dev) if names else {}
    names = [n for n in names if n not in failed]
    progress.step(f"{case.workload} {case.label} {tag}forward")
    for n in names:
        res[n] = {"forward_s": median(times_f[n]), "forward_repeats": len(times_f[n])}
        if n in case.setup_seconds:
            res[n]["setup_s"] = _setup_value(case.setup_seconds[n])
    if case.backward:
        bnames = [n for n in names if n not in case.forward_only]
        xg = on_device(make(True))
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
            return _guard(failed, n, g)
        if bnames:
            times_b = alternating({n: fb(n) for n in bnames}, budget_s=budget_s, device_type=dev)
            for n in bnames:
                if n in failed:
                    res[n]["fwd_bwd_note"] = "backward failed: " + failed.pop(n)
                    continue
                res[n]["fwd_bwd_s"] = median(times_b[n])
                res[n]["fwd_bwd_repeats"] = len(times_b[n])
        progress.step(f"{case.workload} {case.label} {tag}forward+backward")
    return res, outs, x


def _rates(case: Case, contenders: dict, roofline):
    """Speedups against the baseline, GFLOP/s and the fraction of the dtype's matmul roofline."""
    base = contenders.get(case.baseline, {})
    fb_flops = case.flops_backward if case.flops_backward is not None else 2.5 * case.flops
    for r in contenders.values():
        if base.get("forward_s"):
            r["speedup_forward"] = base["forward_s"] / r["forward_s"]
        if base.get("fwd_bwd_s") and r.get("fwd_bwd_s"):
            r["speedup_fwd_bwd"] = base["fwd_bwd_s"] / r["fwd_bwd_s"]
        r["gflops_forward"] = case.flops / r["forward_s"] / 1e9
        r["roofline_frac_forward"] = r["gflops_forward"] / roofline if roofline else None
        if r.get("fwd_bwd_s"):
            r["gflops_fwd_bwd"] = (case.flops + fb_flops) / r["fwd_bwd_s"] / 1e9
            r["roofline_frac_fwd_bwd"] = r["gflops_fwd_bwd"] / roofline if roofline else None


#: the exact contender's float32 forward must take less than this for the low-precision error to be
#: measured against its float64 run (else its float32 run on the same rounded inputs is the truth)
FLOAT64_REFERENCE_MAX_S = 0.5


def _low_precision(case: Case, dtype_name: str, fp32: dict, budget_s: float, progress: Progress, roofline):
    """The case in a low-precision dtype: the float32 inputs cast, every contender timed as in float32; the
    error against the exact contender run in float64 (float32 when that is slow) on the same rounded inputs;
    `vs_float32_*`: the contender's float32 time over its time in this dtype."""
    if case.dtypes is not None and dtype_name not in case.dtypes:
        return {"skipped": case.low_precision_note or f"the case runs in {', '.join(case.dtypes)} only"}
    dtype = getattr(torch, dtype_name)
    if case.make_inputs_dtype is not None:
        make = lambda g: case.make_inputs_dtype(g, dtype)  # noqa: E731
    else:
        if cast_inputs(case.make_inputs(False), dtype)[1] == 0:
            return {"skipped": "its inputs hold no float32 tensor to cast"}
        make = lambda g: cast_inputs(case.make_inputs(g), dtype)[0]  # noqa: E731
    failed: dict[str, str] = {}
    names = [n for n in fp32 if n not in case.low_precision_skip]
    res, outs, x = _time_modes(case, names, make, budget_s, progress, f"{dtype_name} ", failed)
    out = {"contenders": res, "failed": failed, "skip": dict(case.low_precision_skip)}
    if case.exact and case.exact in fp32 and case.exact not in case.low_precision_skip:
        ref_dtype = torch.float64 if fp32[case.exact]["forward_s"] < FLOAT64_REFERENCE_MAX_S else torch.float32
        if case.make_inputs_dtype is not None:  # inputs built in a dtype: the exact contender on wide ones
            wide = case.make_inputs_dtype(False, ref_dtype)
        else:
            wide = {k: (t.detach().to(ref_dtype) if isinstance(t, torch.Tensor) and t.dtype == dtype else t)
                    for k, t in x.items()}
        try:
            with torch.no_grad():
                ref = first_tensor(case.contenders[case.exact](wide))
            out["error_ref"] = f"{case.exact} in {str(ref_dtype).replace('torch.', '')} on the same rounded inputs"
        except Exception as e:  # noqa: BLE001
            ref = None
            out["error_ref"] = f"none: {case.exact} failed in {ref_dtype}: {type(e).__name__}"
        for n, r in res.items():
            if ref is not None and n in outs and outs[n].shape == ref.shape:
                r.update(_rel_errors(outs[n], ref))
    for n, r in res.items():
        if fp32.get(n, {}).get("forward_s"):
            r["vs_float32_forward"] = fp32[n]["forward_s"] / r["forward_s"]
        if fp32.get(n, {}).get("fwd_bwd_s") and r.get("fwd_bwd_s"):
            r["vs_float32_fwd_bwd"] = fp32[n]["fwd_bwd_s"] / r["fwd_bwd_s"]
    _rates(case, res, roofline)
    return out


def run_case(case: Case, index: int, *, quick: bool, memory: bool, budget_s: float, roofline, progress: Progress,
             memory_max_s: float = 20.0, dtypes=("float32",)) -> dict:
    """Run one case: float32 first (inputs as made), then each further dtype of `dtypes` (inputs cast).
    roofline: GFLOP/s of the float32 matmul, or a dict dtype name -> GFLOP/s."""
    roofs = roofline if isinstance(roofline, dict) else {"float32": roofline}
    names = list(case.contenders)
    failed: dict[str, str] = {}
    res = {"workload": case.workload, "label": case.label, "params": case.params, "baseline": case.baseline,
           "flops_forward": case.flops, "contenders": {}, "skip": dict(case.skip), "missing": dict(case.missing),
           "forward_only": dict(case.forward_only), "failed": failed}
    timed, outs, x = _time_modes(case, names, case.make_inputs, budget_s, progress, "", failed)
    # the roofline of the inputs' own dtype (float32 unless a case builds them in another, e.g. bf16 on a GPU)
    in_dtype = next((str(t.dtype).replace("torch.", "") for t in x.values()
                     if isinstance(t, torch.Tensor) and t.is_floating_point()), "float32")
    res["input_dtype"] = in_dtype
    names = [n for n in names if n not in failed]
    for n in names:
        r = timed[n]
        if case.exact and case.exact in outs and n in outs:
            if outs[n].shape == outs[case.exact].shape:
                r.update(_rel_errors(outs[n], outs[case.exact]))
            else:
                r["error_note"] = f"no error: output shape {tuple(outs[n].shape)} differs from the exact one"
        res["contenders"][n] = r
    _rates(case, res["contenders"], roofs.get(in_dtype))
    for dt in dtypes:
        if dt != "float32":
            res.setdefault("dtypes", {})[dt] = _low_precision(case, dt, res["contenders"], budget_s, progress,
                                                              roofs.get(dt))
    if case.metrics is not None:
        try:
            res["metrics"] = case.metrics()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            res["metrics"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
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


DTYPES = ("float32", "bfloat16")


def run(workloads: list[str], *, quick: bool = False, memory: bool = True, budget_s: float = 6.0,
        progress: bool = True, memory_max_s: float = 20.0, dtypes=DTYPES) -> dict:
    """Run the named workloads; returns the JSON-able results. `budget_s`: timing seconds per case,
    mode and dtype (sets the repeats); `memory_max_s`: contenders whose one run takes longer are not
    re-run for the memory measurement (reported as such); `dtypes`: float32 first, then the low-precision
    dtypes every case is also timed in (its roofline measured too)."""
    dtypes = ("float32",) + tuple(d for d in dtypes if d != "float32")
    dev = bench_device()
    roofs = {d: matmul_gflops(str(dev), dtype=getattr(torch, d)) for d in dtypes}
    all_cases = [(w, i, c) for w in workloads for i, c in enumerate(get_cases(w, quick))]
    steps = sum((1 + int(c.backward)) * (1 + sum(c.dtypes is None or d in c.dtypes for d in dtypes[1:]))
                + int(memory) for _, _, c in all_cases)
    bar = Progress(steps, progress)
    results = []
    for w, i, c in all_cases:
        results.append(run_case(c, i, quick=quick, memory=memory, budget_s=budget_s, roofline=roofs, progress=bar,
                                memory_max_s=memory_max_s, dtypes=dtypes))
    bar.close()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "device": str(dev),
                    "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                    "matmul_gflops_fp32": roofs["float32"],
                    "matmul_gflops": roofs},
        "quick": quick, "workloads": workloads, "dtypes": list(dtypes), "cases": results,
    }

