"""Peak memory of one contender on one case, measured in a fresh subprocess.

CPU: the child resets its RSS high-water mark (`/proc/self/clear_refs` = 5) after building the inputs
and reads `VmHWM` from `/proc/self/status` after the run (ru_maxrss would survive execve and report
the parent's peak). The figure is the peak resident memory above the RSS just before the run, after
one untimed warm-up run in the same mode (so one-time library allocations are not counted).
The forward peak is measured with gradients off.
CUDA: `torch.cuda.max_memory_allocated` above the allocation before the run.

Child usage: python -m anyattn.bench.memory WORKLOAD CASE_INDEX CONTENDER QUICK BACKWARD
(BACKWARD=1 measures the forward and then the forward+backward peak in the same child.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_of(run, device, torch) -> int:
    """Peak memory of `run()` above the memory in use just before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - base)
    if not _reset_peak():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs)")
    base = _status_kib("VmRSS") * 1024
    run()
    return max(0, _status_kib("VmHWM") * 1024 - base)


def _child(workload: str, index: int, contender: str, quick: bool, backward: bool) -> dict:
    """Forward peak, then (when `backward`) forward+backward peak, each after a warm-up run in the same
    mode: one-time library, thread-pool and autograd-engine allocations are not the method's memory."""
    import torch
    if os.environ.get("ANYATTN_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["ANYATTN_BENCH_THREADS"]))

    from .case import first_tensor
    from .workloads import get_cases
    case = get_cases(workload, quick)[index]
    fn = case.contenders[contender]
    from .device import on_device
    inputs = on_device(case.make_inputs(backward))
    device = next((t.device for t in inputs.values() if isinstance(t, torch.Tensor)), torch.device("cpu"))

    def forward():
        with torch.no_grad():
            fn(inputs)

    def forward_backward():
        out = first_tensor(fn(inputs))
        out.backward(torch.ones_like(out))
        del out
        for t in inputs.values():
            if isinstance(t, torch.Tensor):
                t.grad = None

    try:
        forward()
        result = {"forward_bytes": _peak_of(forward, device, torch)}
        if backward:
            forward_backward()
            result["fwd_bwd_bytes"] = _peak_of(forward_backward, device, torch)
    except RuntimeError as e:
        return {"error": str(e)}
    return result


def measure(workload: str, index: int, contender: str, quick: bool, backward: bool, timeout_s: float = 600) -> dict:
    """Run the child; returns {"forward_bytes": int[, "fwd_bwd_bytes": int]} or {"error": str}."""
    cmd = [sys.executable, "-m", "anyattn.bench.memory", workload, str(index), contender, str(int(quick)),
           str(int(backward))]
    env = dict(os.environ)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {"error": f"exit {r.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


if __name__ == "__main__":
    w, i, c, q, b = sys.argv[1:6]
    print(json.dumps(_child(w, int(i), c, bool(int(q)), bool(int(b)))))
