"""Run `anyattn.distributed` code with W ranks without a cluster.

- `ThreadComm` / `run_threads(W, fn, *args, **kwargs)`: W threads in this process, one `ThreadComm`
  each (the `Comm` methods over shared-memory queues). Fast; the bulk of the tests use it. Tensors are
  cloned when they cross ranks (ranks never alias each other's memory); every wait has a timeout and
  an exception in any rank aborts the others and is re-raised in the caller. Autograd works (CPU
  backward runs in the thread that calls it).
- `GlooPool(W)`: W worker processes in one real gloo process group over loopback, kept alive for many
  calls (`pool.run(fn, *args, world_size=w)` runs `fn(comm, *args)` on the first w ranks, on a
  sub-group created once at start-up). A test file makes one in a module-scoped fixture and pays the
  start-up once. Workers use 1 intra-op thread. `spawn_gloo(W, fn, *args)` is the one-shot form.

`fn` must be a module-level function (it is sent by module and name); arguments and results must
pickle.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict

import torch

from .comm import Comm, CommLog

DEFAULT_TIMEOUT_S = 120.0


class _Aborted(RuntimeError):
    pass


class _World:
    """What W ThreadComm ranks share: FIFO mailboxes per (src, dst, channel), an abort flag."""

    def __init__(self, world_size: int, timeout_s: float):
        self.world_size, self.timeout_s = world_size, timeout_s
        self.boxes: dict = defaultdict(queue.Queue)
        self.lock = threading.Lock()
        self.abort = threading.Event()

    def box(self, src: int, dst: int, channel) -> queue.Queue:
        with self.lock:
            return self.boxes[(src, dst, channel)]

    def get(self, src: int, dst: int, channel, what: str):
        deadline = time.monotonic() + self.timeout_s
        q = self.box(src, dst, channel)
        while True:
            if self.abort.is_set():
                raise _Aborted(f"rank {dst}: aborted while waiting for {what} from rank {src} (another rank failed)")
            try:
                return q.get(timeout=0.02)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {dst}: no {what} from rank {src} within {self.timeout_s:.0f} s "
                                       "(ranks issued different communication?)") from None


class _ThreadWork:
    def __init__(self, world, src, dst, channel, buf):
        self.args = (world, src, dst, channel, buf)

    def wait(self):
        world, src, dst, channel, buf = self.args
        got = world.get(src, dst, channel, f"message (tag {channel[1]})")
        if got.shape != buf.shape or got.dtype != buf.dtype:
            raise ValueError(f"rank {dst}: received {tuple(got.shape)} {got.dtype} from rank {src}, expected "
                             f"{tuple(buf.shape)} {buf.dtype}")
        buf.copy_(got)


class _Sent:
    def wait(self):
        return None


class ThreadComm(Comm):
    """A `Comm` whose ranks are threads of this process (see `run_threads`)."""

    def __init__(self, world: _World, rank: int):  # noqa: D107  (no process group)
        self.group = None
        self.rank, self.world_size = rank, world.world_size
        self.log = CommLog()
        self._self_box = {}
        self._world = world

    def _put(self, dst, channel, t):
        self._world.box(self.rank, dst, channel).put(t.detach().clone())

    def _get(self, src, channel, what):
        return self._world.get(src, self.rank, channel, what)

    def _isend(self, t, dst, tag):
        self._put(dst, ("p2p", tag), t)
        return _Sent()

    def _irecv(self, buf, src, tag):
        return _ThreadWork(self._world, src, self.rank, ("p2p", tag), buf)

    def _all_gather(self, t):
        for r in range(self.world_size):
            if r != self.rank:
                self._put(r, ("coll",), t)
        return [t.clone() if r == self.rank else self._get(r, ("coll",), "all_gather part")
                for r in range(self.world_size)]

    def _all_to_all_single(self, out, t):
        parts = t.chunk(self.world_size, 0)
        for r in range(self.world_size):
            if r != self.rank:
                self._put(r, ("coll",), parts[r])
        for r, o in enumerate(out.chunk(self.world_size, 0)):
            o.copy_(parts[r] if r == self.rank else self._get(r, ("coll",), "all_to_all part"))

    def _broadcast(self, t, src):
        if self.rank == src:
            for r in range(self.world_size):
                if r != src:
                    self._put(r, ("coll",), t)
        else:
            t.copy_(self._get(src, ("coll",), "broadcast"))

    def _all_reduce(self, t, op):
        parts = self._all_gather(t)  # every rank reduces the same parts in the same order: identical results
        acc = parts[0].clone()
        for p in parts[1:]:
            if op == "sum":
                acc += p
            elif op == "prod":
                acc *= p
            elif op == "max":
                torch.maximum(acc, p, out=acc)
            else:
                torch.minimum(acc, p, out=acc)
        t.copy_(acc)

    def _barrier(self):
        self._all_gather(torch.zeros(1))


def run_threads(world_size: int, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
    """Run `fn(comm, *args, **kwargs)` on `world_size` thread ranks; returns the results by rank.
    An exception in any rank stops the others (their waits abort) and is re-raised here."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    world = _World(world_size, timeout_s)
    results: list = [None] * world_size
    errors: list = [None] * world_size

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(world, rank), *args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors[rank] = e
            world.abort.set()

    if world_size == 1:
        body(0)
    else:
        threads = [threading.Thread(target=body, args=(r,), name=f"anyattn-rank{r}", daemon=True)
                   for r in range(world_size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    primary = [e for e in errors if e is not None and not isinstance(e, _Aborted)]
    if primary:
        raise primary[0]
    aborted = [e for e in errors if e is not None]
    if aborted:
        raise aborted[0]
    return results


# ---------------------------------------------------------------------------------------------- gloo
def _fn_ref(fn) -> tuple:
    mod = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None)
    if mod is None or name is None or "<locals>" in name or "<lambda>" in name:
        raise TypeError(f"fn must be a module-level function (it is sent to the workers by name), got {fn!r}")
    path = getattr(sys.modules.get(mod), "__file__", None)
    return mod, name, path


def _resolve(ref):
    mod, name, path = ref
    module = sys.modules.get(mod) if mod != "__main__" else None
    if module is None:
        try:
            if mod == "__main__":
                raise ImportError
            module = importlib.import_module(mod)
        except ImportError:
            if path is None:
                raise
            alias = mod if mod != "__main__" else "_anyattn_task_main"
            spec = importlib.util.spec_from_file_location(alias, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[alias] = module
            spec.loader.exec_module(module)
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _worker(rank, world_size, store_path, sizes, tasks, results, threads, timeout_s):
    import datetime

    import torch.distributed as dist
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        groups = {world_size: dist.group.WORLD}
        for s in sizes:
            g = dist.new_group(list(range(s)))  # every rank takes part in creating every group
            if rank < s:
                groups[s] = g
        comms = {s: Comm(g) for s, g in groups.items()}
    except BaseException:  # noqa: BLE001
        results.put((-1, rank, "error", traceback.format_exc()))
        return
    results.put((-1, rank, "ok", None))
    while True:
        task = tasks.get()
        if task is None:
            break
        tid, size, ref, args, kwargs = task
        if rank >= size:
            results.put((tid, rank, "skip", None))
            continue
        try:
            comm = comms[size]
            comm.log.reset()
            out = _resolve(ref)(comm, *args, **kwargs)
            results.put((tid, rank, "ok", out))
        except BaseException:  # noqa: BLE001 - reported to the parent
            results.put((tid, rank, "error", traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass


class GlooPool:
    """`world_size` worker processes in one gloo process group, reused across `run` calls.

    sizes: sub-group sizes to create at start-up (default: every size 1..world_size); `run(...,
    world_size=w)` uses the first w ranks. threads: intra-op threads per worker. start_method:
    "forkserver" (default: the workers fork from one server that imported torch once) or "spawn".
    After a failed call the workers are restarted on the next call (a rank that raised may have left
    the others blocked in a collective). Use as a context manager or call `close()`.
    """

    def __init__(self, world_size: int, *, sizes=None, threads: int = 1, timeout_s: float = DEFAULT_TIMEOUT_S,
                 start_method: str = "forkserver"):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        self.world_size, self.threads, self.timeout_s = world_size, threads, timeout_s
        self.sizes = tuple(sorted(set(range(1, world_size)) if sizes is None else
                                  {s for s in sizes if 1 <= s < world_size}))
        self.start_method = start_method
        self._procs: list = []
        self._tid = 0
        self._tmp = None

    # -------------------------------------------------------------- lifecycle
    def _start(self):
        import torch.multiprocessing as mp
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            ctx.set_forkserver_preload(["torch", "anyattn.distributed.testing"])
        self._tmp = tempfile.mkdtemp(prefix="anyattn-gloo-")
        store = os.path.join(self._tmp, "store")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(self.world_size)]
        self._procs = [ctx.Process(target=_worker, args=(r, self.world_size, store, self.sizes, self._tasks[r],
                                                         self._results, self.threads, self.timeout_s), daemon=True)
                       for r in range(self.world_size)]
        for p in self._procs:
            p.start()
        self._collect(-1, self.world_size, "start-up")

    def close(self):
        """Stop the workers (politely, then by force) and remove the store."""
        procs, self._procs = [p for p in self._procs if p.pid is not None], []  # started ones only
        for q, p in zip(getattr(self, "_tasks", []), procs):
            if p.is_alive():
                try:
                    q.put(None)
                except Exception:  # noqa: BLE001
                    pass
        deadline = time.monotonic() + 5
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if self._tmp is not None:
            import shutil
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -------------------------------------------------------------- calls
    def _collect(self, tid, expected, what):
        got: dict = {}
        deadline = time.monotonic() + self.timeout_s
        error = None
        while len(got) < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                t, rank, status, payload = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if any(not p.is_alive() for p in self._procs) and error is None:
                    error = f"a worker process died during {what}"
                    deadline = min(deadline, time.monotonic() + 2.0)
                continue
            if t != tid:
                continue  # a late answer of an earlier, failed call
            got[rank] = (status, payload)
            if status == "error" and error is None:
                error = f"rank {rank} raised during {what}:\n{payload}"
                # The other ranks may be stuck in a collective with the failed one: do not wait long.
                deadline = min(deadline, time.monotonic() + 2.0)
        if error is not None or len(got) < expected:
            self.close()
            raise RuntimeError(error or f"{what}: only {len(got)} of {expected} ranks answered within "
                                        f"{self.timeout_s:.0f} s")
        return got

    def run(self, fn, *args, world_size: int | None = None, **kwargs) -> list:
        """Run `fn(comm, *args, **kwargs)` on ranks 0..world_size-1 (default: all) with a `Comm` over
        their group; returns the results by rank. A failure in any rank raises RuntimeError with its
        traceback."""
        w = self.world_size if world_size is None else world_size
        if w != self.world_size and w not in self.sizes:
            raise ValueError(f"world_size must be {self.world_size} or one of the sub-group sizes {self.sizes}, "
                             f"got {w}")
        if not self._procs:
            self._start()
        ref = _fn_ref(fn)
        self._tid += 1
        for q in self._tasks:
            q.put((self._tid, w, ref, args, kwargs))
        got = self._collect(self._tid, self.world_size, getattr(fn, "__name__", "fn"))
        return [got[r][1] for r in range(w)]


def spawn_gloo(world_size: int, fn, *args, **kwargs) -> list:
    """One-shot: start a `GlooPool(world_size)`, run `fn(comm, *args, **kwargs)` on every rank, stop it."""
    with GlooPool(world_size, sizes=()) as pool:
        return pool.run(fn, *args, **kwargs)
