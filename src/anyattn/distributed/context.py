"""`ad.context_parallel(group, layout)`: run `anyattn.nn` layers context-parallel.

Inside the context every layer of `anyattn.nn` that supports it takes this rank's rows of the sequence
(x `(B, n_local, dim)`) and computes exactly what the single-process layer computes on the whole
sequence, rows of this rank: attention layers rotate q, k at their global positions (RoPE continues
across shards) and call `ad.attention`; linear-attention layers run their short convolutions with the
halo from the neighbouring rank (`ad.causal_conv`) and their mixer with `ad.linear`; Mamba and
Mamba-2 blocks likewise with `ad.selective_scan` / `ad.ssd`. Per-token layers (projections, norms,
MLPs) need nothing. Parameter gradients are this rank's part: all-reduce them (sum) before the
optimizer step, as data parallelism does.

The context is per thread (a `contextvars.ContextVar`), so thread-backed test ranks each have their
own. Decoding (`state=` / `use_cache=True`) is not context-parallel: layers raise inside the context.

    with ad.context_parallel(group, ad.Layout("contiguous", W, N)):
        y = model(ad.shard(x, layout, rank, dim=1))
"""
from __future__ import annotations

import contextlib
import contextvars

from .comm import as_comm
from .layout import Layout, check_layout

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("anyattn_context_parallel", default=None)


class ContextParallel:
    """What layers consult: `comm`, `layout`, `algo` (for `ad.linear` / `ssd` / `selective_scan`),
    `attention_algo` (for `ad.attention`), and helpers with those filled in."""

    def __init__(self, comm, layout: Layout, algo: str = "auto", attention_algo: str = "auto"):
        self.comm, self.layout, self.algo, self.attention_algo = comm, layout, algo, attention_algo

    @property
    def rank(self) -> int:
        return self.comm.rank

    def positions(self, device=None):
        """Global positions of this rank's rows `(n_local,)`."""
        return self.layout.positions(self.comm.rank, device)

    def check_length(self, n: int, what: str = "x") -> None:
        check_layout(self.layout, self.comm.world_size, n, what)

    def refuse_cache(self, layer, state, use_cache) -> None:
        if state is not None or use_cache:
            raise ValueError(f"{type(layer).__name__}: decoding (state= / use_cache=True) is not context-parallel; "
                             "call it outside ad.context_parallel")

    def attention(self, q, k, v, **kw):
        from .attention import attention as _attention
        return _attention(q, k, v, layout=self.layout, group=self.comm, algo=self.attention_algo, **kw)

    def linear(self, op, q, k, v, *args, **kw):
        from .linear_family import linear
        return linear(op, q, k, v, *args, layout=self.layout, group=self.comm, algo=self.algo, **kw)

    def ssd(self, *args, **kw):
        from .linear_family import ssd
        return ssd(*args, layout=self.layout, group=self.comm, algo=self.algo, **kw)

    def selective_scan(self, *args, **kw):
        from .linear_family import selective_scan
        return selective_scan(*args, layout=self.layout, group=self.comm, algo=self.algo, **kw)

    def conv(self, conv, x, kernel_size: int, dim: int = 1):
        """`ad.causal_conv(conv, x, kernel_size)` over this context's shards."""
        from .conv_halo import causal_conv
        return causal_conv(conv, x, kernel_size, layout=self.layout, group=self.comm, dim=dim)

    def __repr__(self):
        return f"ContextParallel(rank={self.comm.rank}, {self.layout!r}, algo={self.algo!r})"


@contextlib.contextmanager
def context_parallel(group=None, layout: Layout | None = None, *, algo: str = "auto", attention_algo: str = "auto"):
    """Make `anyattn.nn` layers run context-parallel over `group` with `layout` (see module doc).
    Yields the `ContextParallel` object. Nesting replaces the outer context until the inner one ends."""
    comm = as_comm(group)
    if layout is None:
        raise ValueError("context_parallel needs layout= (an anyattn.distributed.Layout of the global sequence)")
    check_layout(layout, comm.world_size)
    from .linear_family import _check_algo
    _check_algo(algo)
    token = _CURRENT.set(ContextParallel(comm, layout, algo, attention_algo))
    try:
        yield _CURRENT.get()
    finally:
        _CURRENT.reset(token)


def current() -> ContextParallel | None:
    """The active `ContextParallel` of this thread, or None (layers then run single-process)."""
    return _CURRENT.get()
