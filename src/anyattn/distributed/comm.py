"""The communication layer of `anyattn.distributed`: a process group wrapped with gloo-safe operations
and a per-rank log of the bytes and operations they move (DESIGN.md, METHODS.md "Context parallelism").

Only operations that gloo runs are used: point-to-point `isend` / `irecv` (always waited),
`all_gather`, `all_to_all_single`, `broadcast`, `all_reduce`, `barrier`; never `batch_isend_irecv`
or `reduce_scatter`. The same code runs on NCCL. `anyattn.distributed.testing.ThreadComm` implements
the same methods with threads, so the algorithms run W ranks inside one test process.

Byte log (`comm.log`): payload bytes (`numel * element_size`) this rank puts on / takes off the wire,
per operation, with one formula per operation (W = world size, b = the tensor's bytes):

| method | op name | bytes_sent | bytes_received |
|---|---|---|---|
| `send(t, dst)` / `isend` | "send" | b | 0 |
| `recv(like, src)` / `irecv` | "recv" | 0 | b |
| `sendrecv(t, dst, like, src)` / `isendrecv` | "sendrecv" | b(t) | b(like) |
| `all_gather(t)` | "all_gather" | (W - 1) b | (W - 1) b |
| `all_to_all(t, ...)` | "all_to_all" | (W - 1) b / W | (W - 1) b / W |
| `broadcast(t, src)` | "broadcast" | (W - 1) b on src, 0 elsewhere | 0 on src, b elsewhere |
| `all_reduce(t)` | "all_reduce" | 2 (W - 1) b // W | 2 (W - 1) b // W (ring all-reduce) |
| `barrier()` | "barrier" | 0 | 0 |

A message to oneself (`dst == rank`, e.g. a ring step with W = 1) is a local copy and logs 0 bytes
(the op is still counted). Broadcast and all-reduce log the volume of the textbook algorithms (flat
broadcast, ring all-reduce), not whatever the backend does internally.

Gradients: `all_gather`, `all_to_all`, `broadcast`, `all_reduce(op="sum")` and `sendrecv` are
differentiable (their adjoints run the matching operation in backward, every rank calling backward);
`send`, `recv` and the non-blocking forms are not.
"""
from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Sequence

import torch

REDUCE_OPS = ("sum", "max", "min", "prod")


class CommRecord(NamedTuple):
    """One logged operation: its name and the payload bytes this rank sent plus received."""

    op: str
    bytes: int


class CommLog:
    """Per-rank traffic: `bytes_sent`, `bytes_received` (ints), `ops` (a Counter of op names) and
    `records` (a `CommRecord(op, bytes_sent + bytes_received)` per operation). `reset()` clears it."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.ops: Counter = Counter()
        self.records: list[CommRecord] = []

    def add(self, op: str, sent: int, received: int) -> None:
        self.bytes_sent += int(sent)
        self.bytes_received += int(received)
        self.ops[op] += 1
        self.records.append(CommRecord(op, int(sent) + int(received)))

    def summary(self) -> dict:
        """A JSON-able copy: bytes and op counts."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "ops": dict(self.ops)}

    def __repr__(self):
        return f"CommLog(sent={self.bytes_sent}, received={self.bytes_received}, ops={dict(self.ops)})"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _like(like) -> tuple:
    """`like` is a tensor (its shape, dtype, device), a `(shape, dtype)` pair (on the CPU) or a
    `(shape, dtype, device)` triple -> (shape, dtype, device)."""
    if isinstance(like, torch.Tensor):
        return tuple(like.shape), like.dtype, like.device
    if isinstance(like, (tuple, list)) and len(like) in (2, 3) and isinstance(like[1], torch.dtype):
        return tuple(like[0]), like[1], torch.device(like[2] if len(like) == 3 else "cpu")
    raise TypeError(f"like must be a tensor or a (shape, dtype) pair, got {type(like).__name__}")


class Work:
    """A pending point-to-point operation; `wait()` blocks until it is done and returns the received
    tensor (None for a send)."""

    def __init__(self, waits: Sequence, result=None, finish=None):
        self._waits, self._result, self._finish, self._done = list(waits), result, finish, False

    def wait(self):
        if not self._done:
            for w in self._waits:
                w.wait()
            if self._finish is not None:
                self._result = self._finish(self._result)
            self._done = True
        return self._result


class _Done:
    def wait(self):
        return None


class Comm:
    """A process group (`group=None`: the world group) with gloo-safe operations and a byte log.

    Attributes: `rank`, `world_size` (within the group), `log` (a `CommLog`), `group`.
    Ranks passed to methods (`dst`, `src`) are ranks within the group.
    """

    def __init__(self, group=None):
        import torch.distributed as dist
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("anyattn.distributed needs an initialized torch.distributed process group "
                             "(torch.distributed.init_process_group, or torchrun); for tests pass "
                             "group=anyattn.distributed.testing.ThreadComm ranks via run_threads")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise ValueError("this process is not a member of the given process group")
        self.log = CommLog()
        self._self_box: dict = {}

    # ------------------------------------------------------------------ backend primitives (overridden
    # by ThreadComm). Tensors given to them are contiguous; they never log.
    def _global(self, r: int) -> int:
        import torch.distributed as dist
        return dist.get_global_rank(self.group, r) if self.group is not dist.group.WORLD else r

    def _isend(self, t: torch.Tensor, dst: int, tag: int):
        import torch.distributed as dist
        return dist.isend(t, self._global(dst), group=self.group, tag=tag)

    def _irecv(self, buf: torch.Tensor, src: int, tag: int):
        import torch.distributed as dist
        return dist.irecv(buf, self._global(src), group=self.group, tag=tag)

    def _all_gather(self, t: torch.Tensor) -> list:
        import torch.distributed as dist
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _all_to_all_single(self, out: torch.Tensor, t: torch.Tensor) -> None:
        import torch.distributed as dist
        dist.all_to_all_single(out, t, group=self.group)

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        import torch.distributed as dist
        dist.broadcast(t, self._global(src), group=self.group)

    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        import torch.distributed as dist
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=self.group)

    def _barrier(self) -> None:
        import torch.distributed as dist
        dist.barrier(group=self.group)

    # ------------------------------------------------------------------ checks
    def _check_rank(self, name: str, r) -> int:
        if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.world_size:
            raise ValueError(f"{name} must be a rank in [0, {self.world_size}), got {r!r}")
        return r

    @staticmethod
    def _check_tensor(name: str, t) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        return t.detach().contiguous()

    # ------------------------------------------------------------------ point to point
    def isend(self, t: torch.Tensor, dst: int, tag: int = 0, *, _op: str | None = "send") -> Work:
        """Start sending `t` to rank `dst`; `wait()` the returned Work before reusing `t`."""
        self._check_rank("dst", dst)
        t = self._check_tensor("t", t)
        if dst == self.rank:
            self._self_box.setdefault(tag, []).append(t.clone())
            if _op:
                self.log.add(_op, 0, 0)
            return Work([_Done()])
        if _op:
            self.log.add(_op, nbytes(t), 0)
        return Work([self._isend(t, dst, tag)])

    def irecv(self, like, src: int, tag: int = 0, *, out: torch.Tensor | None = None,
              _op: str | None = "recv") -> Work:
        """Start receiving a tensor shaped like `like` from rank `src`; `wait()` returns it. `out`: a
        contiguous tensor of that shape and dtype to receive into (reused buffers), else a new one."""
        self._check_rank("src", src)
        shape, dtype, device = _like(like)
        if out is not None and (tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous()):
            raise ValueError(f"out must be a contiguous {shape} {dtype} tensor, got {tuple(out.shape)} {out.dtype}")
        if src == self.rank:
            def take(_):
                box = self._self_box.get(tag)
                if not box:
                    raise RuntimeError(f"rank {self.rank}: irecv from itself with tag {tag} has no matching isend")
                got = box.pop(0)
                if tuple(got.shape) != shape or got.dtype != dtype:
                    raise ValueError(f"irecv like {shape} {dtype} does not match the tensor sent, {tuple(got.shape)} "
                                     f"{got.dtype}")
                return got if out is None else out.copy_(got)
            if _op:
                self.log.add(_op, 0, 0)
            return Work([_Done()], None, take)
        buf = torch.empty(shape, dtype=dtype, device=device) if out is None else out
        if _op:
            self.log.add(_op, 0, nbytes(buf))
        return Work([self._irecv(buf, src, tag)], buf)

    def send(self, t: torch.Tensor, dst: int, tag: int = 0) -> None:
        """Send `t` to rank `dst` (blocking)."""
        self.isend(t, dst, tag).wait()

    def recv(self, like, src: int, tag: int = 0) -> torch.Tensor:
        """Receive a tensor shaped like `like` (a tensor or a `(shape, dtype)` pair) from rank `src`."""
        return self.irecv(like, src, tag).wait()

    def isendrecv(self, t: torch.Tensor, dst: int, like, src: int, tag: int = 0, *,
                  out: torch.Tensor | None = None) -> Work:
        """One ring step, started: send `t` to `dst` while receiving a tensor like `like` from `src`
        (both non-blocking, so deadlock-free for any W); `wait()` returns the received tensor (in
        `out` when given: it must not be `t`)."""
        self._check_rank("dst", dst)
        self._check_rank("src", src)
        t = self._check_tensor("t", t)
        if out is not None and out.data_ptr() == t.data_ptr():
            raise ValueError("isendrecv: out must be a different buffer than the tensor sent")
        r = self.irecv(like, src, tag, out=out, _op=None)
        s = self.isend(t, dst, tag, _op=None)
        shape, dtype, _ = _like(like)
        self.log.add("sendrecv", 0 if dst == self.rank else nbytes(t),
                     0 if src == self.rank else torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size())
        return Work([s], r, lambda rr: rr.wait())

    def sendrecv(self, t: torch.Tensor, dst: int, like, src: int, tag: int = 0) -> torch.Tensor:
        """One ring step: send `t` to `dst`, receive a tensor like `like` from `src`. Differentiable:
        the received tensor's gradient goes back to `src`."""
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            return _SendRecv.apply(self, t, dst, like, src, tag)
        return self.isendrecv(t, dst, like, src, tag).wait()

    # ------------------------------------------------------------------ collectives
    def all_gather(self, t: torch.Tensor) -> list:
        """Every rank's `t` (same shape on every rank), as a list indexed by rank. Differentiable: in
        backward each rank's gradients for piece r are sent to rank r and summed there (an all-to-all)."""
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            return list(_AllGather.apply(self, t))
        return self._all_gather_raw(self._check_tensor("t", t))

    def _all_gather_raw(self, t: torch.Tensor) -> list:
        W = self.world_size
        self.log.add("all_gather", (W - 1) * nbytes(t), (W - 1) * nbytes(t))
        if W == 1:
            return [t.clone()]
        return self._all_gather(t)

    def all_to_all(self, t: torch.Tensor, split_dim: int, cat_dim: int) -> torch.Tensor:
        """Split `t` in W equal parts along `split_dim`, send part r to rank r, and concatenate the parts
        received (ordered by source rank) along `cat_dim` (the Ulysses sequence <-> heads exchange).
        Differentiable (the adjoint swaps split_dim and cat_dim)."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor, got {type(t).__name__}")
        split_dim, cat_dim = split_dim % t.dim(), cat_dim % t.dim()
        if t.shape[split_dim] % self.world_size != 0:
            raise ValueError(f"all_to_all needs t.shape[split_dim={split_dim}] = {t.shape[split_dim]} divisible by "
                             f"the world size {self.world_size}")
        if t.requires_grad and torch.is_grad_enabled():
            return _AllToAll.apply(self, t, split_dim, cat_dim)
        return self._all_to_all_raw(t.detach(), split_dim, cat_dim)

    def _all_to_all_raw(self, t: torch.Tensor, split_dim: int, cat_dim: int) -> torch.Tensor:
        W = self.world_size
        self.log.add("all_to_all", (W - 1) * nbytes(t) // W, (W - 1) * nbytes(t) // W)
        if W == 1:
            return t.clone()
        parts = torch.stack(t.chunk(W, dim=split_dim))  # (W, *part): one copy, contiguous
        out = torch.empty_like(parts)
        self._all_to_all_single(out, parts)
        return torch.cat(out.unbind(0), dim=cat_dim)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s `t` on every rank (other ranks pass a tensor of the same shape and dtype; its
        values are ignored). Differentiable: the gradients of all ranks are summed on `src`."""
        self._check_rank("src", src)
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            return _Broadcast.apply(self, t, src)
        return self._broadcast_raw(self._check_tensor("t", t), src)

    def _broadcast_raw(self, t: torch.Tensor, src: int) -> torch.Tensor:
        W = self.world_size
        b = nbytes(t)
        self.log.add("broadcast", (W - 1) * b if self.rank == src else 0, 0 if self.rank == src else b)
        buf = t.clone()
        if W > 1:
            self._broadcast(buf, src)
        return buf

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """The elementwise reduction (`op` in "sum", "max", "min", "prod") of every rank's `t`, as a new
        tensor. Differentiable for op="sum" (the adjoint is an all-reduce of the gradients)."""
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")
        if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
            if op != "sum":
                raise ValueError(f"all_reduce is differentiable only for op='sum', got op={op!r} on a tensor "
                                 "that requires grad")
            return _AllReduce.apply(self, t)
        return self._all_reduce_raw(self._check_tensor("t", t), op)

    def _all_reduce_raw(self, t: torch.Tensor, op: str) -> torch.Tensor:
        W = self.world_size
        vol = 2 * (W - 1) * nbytes(t) // W
        self.log.add("all_reduce", vol, vol)
        buf = t.clone()
        if W > 1:
            self._all_reduce(buf, op)
        return buf

    def barrier(self) -> None:
        """Wait until every rank of the group reaches the barrier."""
        self.log.add("barrier", 0, 0)
        if self.world_size > 1:
            self._barrier()

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size})"


# ---------------------------------------------------------------------------------------------- autograd
class _SendRecv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t, dst, like, src, tag):
        ctx.comm, ctx.dst, ctx.src, ctx.tag = comm, dst, src, tag
        ctx.t_meta = (tuple(t.shape), t.dtype, t.device)
        return comm.isendrecv(t, dst, like, src, tag).wait()

    @staticmethod
    def backward(ctx, g):
        c = ctx.comm
        dt = c.isendrecv(g, ctx.src, ctx.t_meta, ctx.dst, ctx.tag).wait()
        return None, dt, None, None, None, None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t):
        ctx.comm = comm
        return tuple(comm._all_gather_raw(t.detach().contiguous()))

    @staticmethod
    def backward(ctx, *grads):
        c = ctx.comm
        ref = next(g for g in grads if g is not None)
        g = torch.stack([torch.zeros_like(ref) if x is None else x for x in grads])  # (W, *shape)
        mine = c._all_to_all_raw(g, 0, 0)  # piece r of every rank's gradient lands on rank r
        return None, mine.view(c.world_size, *ref.shape).sum(0)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t, split_dim, cat_dim):
        ctx.comm, ctx.dims = comm, (split_dim, cat_dim)
        return comm._all_to_all_raw(t.detach(), split_dim, cat_dim)

    @staticmethod
    def backward(ctx, g):
        split_dim, cat_dim = ctx.dims
        return None, ctx.comm._all_to_all_raw(g.contiguous(), cat_dim, split_dim), None, None


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t, src):
        ctx.comm, ctx.src = comm, src
        return comm._broadcast_raw(t.detach().contiguous(), src)

    @staticmethod
    def backward(ctx, g):
        c = ctx.comm
        total = c._all_reduce_raw(g.contiguous(), "sum")
        return None, (total if c.rank == ctx.src else torch.zeros_like(total)), None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, comm, t):
        ctx.comm = comm
        return comm._all_reduce_raw(t.detach().contiguous(), "sum")

    @staticmethod
    def backward(ctx, g):
        return None, ctx.comm._all_reduce_raw(g.contiguous(), "sum")


# ---------------------------------------------------------------------------------------------- as_comm
_CACHE: dict = {}


def as_comm(group=None) -> Comm:
    """Normalize the `group=` argument of every `anyattn.distributed` function: a `Comm` (returned as
    is, e.g. a `testing.ThreadComm`), a `torch.distributed.ProcessGroup`, or None (the world group).
    Process groups map to one cached `Comm` each, so `as_comm(group).log` accumulates across calls."""
    if isinstance(group, Comm):
        return group
    import torch.distributed as dist
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be None, a torch.distributed.ProcessGroup or an anyattn.distributed.Comm, "
                        f"got {type(group).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        Comm(group)  # raises the explanatory error
    pg = group if group is not None else dist.group.WORLD
    hit = _CACHE.get(id(pg))
    if hit is None or hit.group is not pg:
        hit = Comm(pg)
        _CACHE[id(pg)] = hit
    return hit
