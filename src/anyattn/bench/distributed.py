"""Benchmark helpers for `anyattn.distributed` (shared by the `cp_attention` and `cp` workloads).

- `remote(W, fn, *args)`: a contender that runs `fn(comm, *args, backward=...)` on W gloo worker
  processes with 1 intra-op thread each (a `GlooPool` kept for the whole bench run) and returns when
  every rank is done. The parent times the call (dispatch included: about a millisecond). In the
  runner's forward+backward mode the ranks run forward and backward themselves (`backward=True`); the
  contender returns a zero scalar tied to the parent's inputs so that the runner's own backward call
  costs nothing. `fn` returns a dict (e.g. the byte log); the last results are kept (`last_results`).
  List the contender in `Case.setup_seconds` with `lambda: first_call_s.get(name)`: the runner then
  makes an untimed first call (pool start-up, inputs built and cached in the workers).
- `peak_memory(W, fn, *args)`: runs `fn(comm, *args)` once in W *fresh* worker processes, each
  reporting its peak resident memory (VmHWM) above its resident memory before it built its inputs
  (`with_inputs`) and above the memory right after (`without_inputs`). `fn(comm, *args)` must return
  `(build, run)`: `inputs = build()` allocates this rank's inputs, `run(inputs)` does the work. A small
  call first (`warmup`) loads the kernels and thread pools so one-time allocations are not counted.
- `with_threads(n, fn)`: run fn with n torch intra-op threads (the single-process baselines: 1 thread).
"""
from __future__ import annotations

import atexit
import time

import torch

from ..distributed.testing import GlooPool
from .memory import _reset_peak, _status_kib

_POOLS: dict = {}
last_results: dict = {}
first_call_s: dict = {}  # name -> seconds of the first call (pool start-up, building the inputs)


def pool(W: int) -> GlooPool:
    """A gloo pool of W single-threaded workers, shared for the process lifetime."""
    if W not in _POOLS:
        _POOLS[W] = GlooPool(W, sizes=(), threads=1, timeout_s=1800)
        atexit.register(_POOLS[W].close)
    return _POOLS[W]


def remote(W: int, fn, *args, name: str | None = None):
    """A bench contender running `fn(comm, *args, backward=bool)` on W single-threaded gloo ranks."""
    key = name or fn.__name__

    def contender(x):
        q = next(t for t in x.values() if isinstance(t, torch.Tensor))
        backward = q.requires_grad
        t0 = time.perf_counter()
        res = pool(W).run(fn, *args, backward=backward)
        first_call_s.setdefault(key, time.perf_counter() - t0)
        last_results[(key, backward)] = res
        return q.reshape(-1)[:1].sum() * 0 if backward else torch.zeros(())
    return contender


def with_threads(n: int, fn):
    def call(x):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            return fn(x)
        finally:
            torch.set_num_threads(old)
    return call


def fixed_mmap_threshold(nbytes: int = 128 << 10) -> bool:
    """Make glibc serve every allocation of at least `nbytes` with mmap (returned to the system when
    freed) by fixing M_MMAP_THRESHOLD; glibc otherwise raises the threshold up to 32 MiB after such
    frees, and freed mid-sized blocks then stay resident (fragmentation) and count in VmHWM."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False


def _measure(comm, fn, args, warmup_args, fixed_threshold):
    if fixed_threshold and not fixed_mmap_threshold():
        raise RuntimeError("cannot set glibc's M_MMAP_THRESHOLD (mallopt)")
    if warmup_args is not None:
        build, run = fn(comm, *warmup_args)
        run(build())
    import gc
    gc.collect()
    r0 = _status_kib("VmRSS") * 1024
    build, run = fn(comm, *args)
    inputs = build()
    r1 = _status_kib("VmRSS") * 1024
    if not _reset_peak():
        raise RuntimeError("cannot reset VmHWM (/proc/self/clear_refs)")
    run(inputs)
    peak = _status_kib("VmHWM") * 1024
    return {"with_inputs": peak - r0, "without_inputs": peak - r1, "log": comm.log.summary()}


def peak_memory(W: int, fn, *args, warmup_args=None, fixed_threshold: bool = False) -> list[dict]:
    """Per-rank peak memory of `fn` (see the module docstring), in fresh processes; `fixed_threshold`:
    with `fixed_mmap_threshold()` (live memory without the allocator's fragmentation)."""
    with GlooPool(W, sizes=(), threads=1, timeout_s=1800) as p:
        return p.run(_measure, fn, args, warmup_args, fixed_threshold)
