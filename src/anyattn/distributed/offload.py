"""Attention offloading (Lamina: Chen et al., "Efficient and Economic Large Language Model Inference with
Attention Offloading", 2024): the model side keeps the weights, attention-server processes keep the KV
caches. Per layer and decoding step the client sends `q` and the new `k`, `v`; the servers append,
attend and send back `o` (and the LSE when the cache is split by sequence, merged exactly by
`anyattn.merge`). Traffic per step does not grow with the context.

* `partial_decode(q, cache)`: `(out, lse)` of q over the tokens a cache holds, to be merged with other
  shards' by LSE; with `q_positions` / `key_positions` (global positions), the causal rule is taken
  on those positions (a shard holding any subset of the tokens).
* `AttentionServer(group, client=0, shard="heads" | "sequence")`: `serve()` runs on every server rank
  until the client stops it, holding one `KVCache` per layer id: the server's block of KV heads
  ("heads": exact `decode` on them), or the tokens whose global position p has `(p // block) % S`
  equal to its index among the S servers ("sequence": `partial_decode` on global positions).
* `RemoteKVCache(layer, batch_size, num_kv_heads, max_len, head_dim, ...)`: the client's stand-in for
  a layer's `KVCache`: `append(k, v, n_new=None)`, `decode(q, scale=None, return_lse=False)`,
  `lengths`; `anyattn.decode(q, remote)` calls it, and `anyattn.nn.Attention` takes it as its state,
  so `anyattn.nn.generate(layers, prompt, n, states=[...])` decodes with remote caches.
  `stop_servers(group)` ends the servers' loops.

Messages are point-to-point (`Comm.send` / `recv`, tag `OFFLOAD_TAG`): a fixed-size int64 header,
then the tensors it describes. A server that fails replies with the error text, which the client raises.
"""
from __future__ import annotations

import torch

from ..api import attention
from ..cache.decode import decode
from ..cache.kv_cache import KVCache
from ..lse import merge
from ..validate import FLOAT_DTYPES, check_positive_int, check_scale, check_tensor
from .comm import as_comm

OFFLOAD_TAG = 7
HEADER = 12
OP_APPEND, OP_DECODE, OP_FREE, OP_STOP = 1, 2, 3, 4
OK, ERROR = 0, 1
DTYPES = list(FLOAT_DTYPES)
SHARDS = ("heads", "sequence")


# ---------------------------------------------------------------------------------------- the math
def partial_decode(q: torch.Tensor, cache: KVCache, *, scale=None, q_positions=None, key_positions=None):
    """Attention of q `(B, H, T, D)` over the tokens in `cache`, with its LSE: `(out (B, H, T, D_v), lse
    (B, H, T))`. Merge the parts of a cache split over processes with `anyattn.merge`.

    Without positions: `decode(q, cache, return_lse=True)` (query t of the chunk sits at `lengths[b] - T
    + t`). With q_positions `(B, T)` and key_positions `(B, L)` (L >= the cache's longest sequence; the
    global position of each stored token): query t of sequence b sees the stored tokens j < lengths[b]
    with `key_positions[b, j] <= q_positions[b, t]` (exact attention over the stored keys, dequantized
    or back-projected; rows that see none give 0 and LSE -inf)."""
    if (q_positions is None) != (key_positions is None):
        raise ValueError("give both q_positions and key_positions, or neither")
    if q_positions is None:
        return decode(q, cache, scale=scale, return_lse=True)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an anyattn.cache.KVCache, got {type(cache).__name__}")
    check_tensor("q", q, 4)
    B, H, T, D = q.shape
    if B != cache.B or H % cache.H_kv or D != cache.D:
        raise ValueError(f"q must have shape (B={cache.B}, H (a multiple of H_kv={cache.H_kv}), T, D={cache.D}), "
                         f"got {tuple(q.shape)}")
    if tuple(q_positions.shape) != (B, T):
        raise ValueError(f"q_positions must have shape (B, T) = {(B, T)}, got {tuple(q_positions.shape)}")
    L = cache.max_length
    if key_positions.dim() != 2 or key_positions.shape[0] != B or key_positions.shape[1] < L:
        raise ValueError(f"key_positions must have shape (B={B}, L >= {L}), got {tuple(key_positions.shape)}")
    scale = check_scale(scale, D)
    G = H // cache.H_kv
    if L == 0:
        return q.new_zeros(B, H, T, cache.D_v), torch.full((B, H, T), float("-inf"),
                                                          dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    k, v = cache.reconstruct()
    kp = key_positions[:, :L].to(q.device)
    valid = torch.arange(L, device=q.device)[None, :] < cache.lengths[:, None]
    allowed = valid[:, None, :] & (kp[:, None, :] <= q_positions.to(q.device)[:, :, None])    # (B, T, L)
    mask = allowed[:, None, None].expand(B, 1, G, T, L).reshape(B, 1, G * T, L)
    out, lse = attention(q.reshape(B, cache.H_kv, G * T, D), k.to(q.dtype), v.to(q.dtype), mask=mask, scale=scale,
                         return_lse=True)
    return out.reshape(B, H, T, -1), lse.reshape(B, H, T)


# ---------------------------------------------------------------------------------------- messages
def _header(*vals) -> torch.Tensor:
    h = torch.zeros(HEADER, dtype=torch.long)  # host: protocol header/message (gloo point-to-point)
    h[:len(vals)] = torch.tensor([int(x) for x in vals], dtype=torch.long)  # host: protocol header/message (gloo point-to-point)
    return h


def _send_error(comm, dst, err: BaseException):
    text = f"{type(err).__name__}: {err}".encode()[:4000]
    comm.send(_header(ERROR, len(text)), dst, OFFLOAD_TAG)
    comm.send(torch.tensor(list(text), dtype=torch.uint8), dst, OFFLOAD_TAG)  # host: protocol header/message (gloo point-to-point)


def _recv_reply(comm, src) -> torch.Tensor:
    h = comm.recv(((HEADER,), torch.long), src, OFFLOAD_TAG)
    if int(h[0]) == ERROR:
        text = comm.recv(((int(h[1]),), torch.uint8), src, OFFLOAD_TAG)
        raise RuntimeError(f"attention server rank {src}: {bytes(text.tolist()).decode(errors='replace')}")
    return h


# ---------------------------------------------------------------------------------------- server
class AttentionServer:
    """Holds the KV caches of offloaded attention layers on this rank (see module doc).

    group: the process group (or `Comm`) shared with the client; client: the client's rank; servers: the
    server ranks (default: every other rank), in shard order; shard: "heads" or "sequence"; block:
    tokens per sequence block ("sequence"); cache_len: initial capacity; cache_options: extra `KVCache`
    arguments (e.g. `quantize="int8"`; with "sequence" the exact path over the stored keys is used,
    so no token-selection policy there)."""

    def __init__(self, group=None, client: int = 0, servers=None, *, shard: str = "heads", block: int = 256,
                 cache_len: int = 256, cache_options: dict | None = None):
        self.comm = as_comm(group)
        self.client = client
        self.servers = _servers(self.comm, client, servers)
        if self.comm.rank not in self.servers:
            raise ValueError(f"rank {self.comm.rank} is not one of the server ranks {self.servers}")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        self.shard, self.block = shard, check_positive_int("block", block)
        self.cache_len, self.cache_options = check_positive_int("cache_len", cache_len), dict(cache_options or {})
        if shard == "sequence" and self.cache_options.get("policy") not in (None, "exact"):
            raise ValueError("shard='sequence' attends exactly over each server's tokens: no token-selection policy")
        self.caches: dict = {}
        self.positions: dict = {}

    def serve(self) -> None:
        """Answer the client's messages until it sends stop."""
        c, src = self.comm, self.client
        while True:
            h = c.recv(((HEADER,), torch.long), src, OFFLOAD_TAG)
            op, layer = int(h[0]), int(h[1])
            if op == OP_STOP:
                return
            try:
                if op == OP_APPEND:
                    self._append(layer, h)
                elif op == OP_DECODE:
                    self._decode(layer, h)
                elif op == OP_FREE:
                    for key in ([layer] if layer >= 0 else list(self.caches)):
                        self.caches.pop(key, None)
                        self.positions.pop(key, None)
                else:
                    raise ValueError(f"unknown message op {op}")
            except Exception as e:  # noqa: BLE001 - the client raises it
                _send_error(c, src, e)
            else:
                if op in (OP_APPEND, OP_FREE):
                    c.send(_header(OK), src, OFFLOAD_TAG)

    def _append(self, layer, h):
        c, src = self.comm, self.client
        B, Hk, T, D, Dv, dt, has_n = (int(x) for x in h[2:9])
        dtype = DTYPES[dt]
        if T == 0:                       # none of the new tokens lands on this server
            return
        k = c.recv(((B, Hk, T, D), dtype), src, OFFLOAD_TAG)
        v = c.recv(((B, Hk, T, Dv), dtype), src, OFFLOAD_TAG)
        n_new = c.recv(((B,), torch.long), src, OFFLOAD_TAG) if has_n else None
        pos = c.recv(((B, T), torch.long), src, OFFLOAD_TAG) if self.shard == "sequence" else None
        cache = self.caches.get(layer)
        if cache is None:
            cache = KVCache(B, Hk, self.cache_len, D, Dv, dtype=dtype, **self.cache_options)
            self.caches[layer] = cache
            self.positions[layer] = torch.zeros(B, self.cache_len, dtype=torch.long)  # host: server-side position bookkeeping
        if self.shard == "sequence":
            n = [T] * B if n_new is None else n_new.tolist()
            P = self.positions[layer]
            need = max(a + b for a, b in zip(cache.lengths_list(), n))
            if need > P.shape[1]:
                P = torch.cat([P, P.new_zeros(B, max(need, 2 * P.shape[1]) - P.shape[1])], 1)
            for b, (L0, m) in enumerate(zip(cache.lengths_list(), n)):
                P[b, L0:L0 + m] = pos[b, :m]
            self.positions[layer] = P
        cache.append(k, v, n_new)

    def _decode(self, layer, h):
        c, src = self.comm, self.client
        B, Hq, T, D, dt = (int(x) for x in h[2:7])
        dtype = DTYPES[dt]
        q = c.recv(((B, Hq, T, D), dtype), src, OFFLOAD_TAG)
        scale = float(c.recv(((1,), torch.float64), src, OFFLOAD_TAG))
        qpos = c.recv(((B, T), torch.long), src, OFFLOAD_TAG) if self.shard == "sequence" else None
        cache = self.caches.get(layer)
        if cache is None or cache.max_length == 0:
            if self.shard == "heads":
                raise ValueError(f"layer {layer} has no keys on this server: append before decode")
            out = q.new_zeros(B, Hq, T, int(h[7]))
            lse = torch.full((B, Hq, T), float("-inf"), dtype=torch.promote_types(dtype, torch.float32), device=q.device)
        elif self.shard == "heads":
            out, lse = decode(q, cache, scale=scale), None
        else:
            out, lse = partial_decode(q, cache, scale=scale, q_positions=qpos, key_positions=self.positions[layer])
        c.send(_header(OK, 0 if lse is None else 1, DTYPES.index(lse.dtype) if lse is not None else 0), src,
               OFFLOAD_TAG)
        c.send(out.contiguous(), src, OFFLOAD_TAG)
        if lse is not None:
            c.send(lse.contiguous(), src, OFFLOAD_TAG)


def _servers(comm, client, servers):
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < comm.world_size:
        raise ValueError(f"client must be a rank in [0, {comm.world_size}), got {client!r}")
    servers = [r for r in range(comm.world_size) if r != client] if servers is None else list(servers)
    if not servers or client in servers or len(set(servers)) != len(servers) or \
            any(not 0 <= r < comm.world_size for r in servers):
        raise ValueError(f"servers must be distinct ranks in [0, {comm.world_size}) other than the client {client}, "
                         f"got {servers}")
    return servers


def stop_servers(group=None, servers=None, client: int = 0) -> None:
    """Tell every server's `serve()` loop to return (call on the client)."""
    comm = as_comm(group)
    for s in _servers(comm, client, servers):
        comm.send(_header(OP_STOP), s, OFFLOAD_TAG)


# ---------------------------------------------------------------------------------------- client
class RemoteKVCache:
    """The client's handle on one attention layer's cache held by the servers (see module doc).

    layer: an id unique per layer (an int >= 0); batch_size, num_kv_heads, max_len (unused beyond the
    servers' growth), head_dim, v_head_dim: as `KVCache`; dtype, device of the client's tensors; group,
    client, servers, shard, block: as the servers were started with. "heads" needs num_kv_heads divisible
    by the number of servers."""

    def __init__(self, layer: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 v_head_dim: int | None = None, *, dtype: torch.dtype = torch.float32, device=None, group=None,
                 client: int = 0, servers=None, shard: str = "heads", block: int = 256):
        self.comm = as_comm(group)
        if self.comm.rank != client:
            raise ValueError(f"RemoteKVCache lives on the client rank {client}, not rank {self.comm.rank}")
        self.servers = _servers(self.comm, client, servers)
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {layer!r}")
        if shard not in SHARDS:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        self.layer, self.shard, self.block = layer, shard, check_positive_int("block", block)
        self.B = check_positive_int("batch_size", batch_size)
        self.H_kv = check_positive_int("num_kv_heads", num_kv_heads)
        check_positive_int("max_len", max_len)
        self.D = check_positive_int("head_dim", head_dim)
        self.D_v = check_positive_int("v_head_dim", head_dim if v_head_dim is None else v_head_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        self.dtype, self.device = dtype, torch.device("cpu") if device is None else torch.device(device)
        S = len(self.servers)
        if shard == "heads" and self.H_kv % S:
            raise ValueError(f"shard='heads' needs num_kv_heads ({self.H_kv}) divisible by the {S} servers")
        self._lens = [0] * self.B
        self.lengths = torch.zeros(self.B, dtype=torch.long, device=self.device)

    # KVCache's read-only surface used by layers and decode
    @property
    def max_length(self) -> int:
        return max(self._lens)

    def lengths_list(self) -> list:
        return list(self._lens)

    def __repr__(self):
        return (f"RemoteKVCache(layer={self.layer}, B={self.B}, H_kv={self.H_kv}, D={self.D}, shard={self.shard!r}, "
                f"servers={self.servers}, lengths={self._lens})")

    def _send(self, s, *tensors):
        for t in tensors:
            self.comm.send(t.detach().contiguous(), s, OFFLOAD_TAG)

    def append(self, k: torch.Tensor, v: torch.Tensor, n_new=None) -> None:
        """Write new tokens on the servers: k `(B, H_kv, T, D)`, v `(B, H_kv, T, D_v)`; n_new None or `(B,)`
        counts (sequence b appends its first n_new[b] tokens), as `KVCache.append`."""
        check_tensor("k", k, 4)
        check_tensor("v", v, 4)
        B, H, T, D = k.shape
        if (B, H, D) != (self.B, self.H_kv, self.D) or tuple(v.shape) != (B, H, T, self.D_v):
            raise ValueError(f"k, v must have shapes (B={self.B}, H_kv={self.H_kv}, T, D={self.D}) and (..., "
                             f"D_v={self.D_v}), got {tuple(k.shape)} and {tuple(v.shape)}")
        for name, x in (("k", k), ("v", v)):
            if x.dtype != self.dtype:
                raise ValueError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
        n = [T] * B if n_new is None else [int(x) for x in (n_new.tolist() if isinstance(n_new, torch.Tensor)
                                                             else n_new)]
        if len(n) != B or any(x < 0 or x > T for x in n):
            raise ValueError(f"n_new must hold B = {B} counts in [0, T = {T}], got {n}")
        dt = DTYPES.index(self.dtype)
        S = len(self.servers)
        if self.shard == "heads":
            h = self.H_kv // S
            for i, s in enumerate(self.servers):
                self._send(s, _header(OP_APPEND, self.layer, B, h, T, D, self.D_v, dt, n_new is not None))
                self._send(s, k[:, i * h:(i + 1) * h], v[:, i * h:(i + 1) * h])
                if n_new is not None:
                    self._send(s, torch.tensor(n, dtype=torch.long))  # host: protocol message / client bookkeeping
        else:
            pos = torch.tensor(self._lens)[:, None] + torch.arange(T)[None, :]  # host: (B, T) global positions, client bookkeeping
            owner = (pos // self.block) % S
            for i, s in enumerate(self.servers):
                mine = [[t for t in range(n[b]) if int(owner[b, t]) == i] for b in range(B)]
                Ts = max(len(m) for m in mine)
                idx = torch.tensor([m + [0] * (Ts - len(m)) for m in mine], dtype=torch.long).reshape(B, Ts)  # host: protocol message / client bookkeeping
                ks = k.gather(2, idx[:, None, :, None].expand(B, H, Ts, D).to(k.device))
                vs = v.gather(2, idx[:, None, :, None].expand(B, H, Ts, self.D_v).to(v.device))
                self._send(s, _header(OP_APPEND, self.layer, B, H, Ts, D, self.D_v, dt, 1))
                if Ts:
                    self._send(s, ks, vs, torch.tensor([len(m) for m in mine], dtype=torch.long), pos.gather(1, idx))  # host: protocol message / client bookkeeping
        for s in self.servers:
            _recv_reply(self.comm, s)
        self._lens = [a + b for a, b in zip(self._lens, n)]
        self.lengths = torch.tensor(self._lens, dtype=torch.long, device=self.device)

    def decode(self, q: torch.Tensor, *, scale=None, return_lse: bool = False, **unused):
        """`anyattn.decode(q, cache)` over the servers' caches: q `(B, H, T, D)` (after `append` of the
        step's keys/values). Returns out `(B, H, T, D_v)`, or `(out, lse)`; "heads" servers return no
        LSE (return_lse=True then needs "sequence")."""
        check_tensor("q", q, 4)
        B, H, T, D = q.shape
        if B != self.B or H % self.H_kv or D != self.D:
            raise ValueError(f"q must have shape (B={self.B}, H (a multiple of H_kv={self.H_kv}), T, D={self.D}), "
                             f"got {tuple(q.shape)}")
        if q.dtype != self.dtype:
            raise ValueError(f"q must have the cache's dtype {self.dtype}, got {q.dtype}")
        if self.max_length == 0:
            raise ValueError("the cache is empty: append the step's keys/values before decode")
        if return_lse and self.shard == "heads":
            raise ValueError("return_lse=True needs shard='sequence' (head-sharded servers return outputs only)")
        scale_t = torch.tensor([check_scale(scale, D)], dtype=torch.float64)  # host: protocol message / client bookkeeping
        dt = DTYPES.index(q.dtype)
        S = len(self.servers)
        qpos = self.lengths.cpu()[:, None] - T + torch.arange(T)[None, :]  # host: protocol message / client bookkeeping
        hq = H // S if self.shard == "heads" else H
        for i, s in enumerate(self.servers):
            part = q[:, i * hq:(i + 1) * hq] if self.shard == "heads" else q
            self._send(s, _header(OP_DECODE, self.layer, B, hq, T, D, dt, self.D_v), part, scale_t)
            if self.shard == "sequence":
                self._send(s, qpos)
        outs, lses = [], []
        for s in self.servers:
            h = _recv_reply(self.comm, s)
            outs.append(self.comm.recv(((B, hq, T, self.D_v), q.dtype), s, OFFLOAD_TAG).to(q.device))
            if int(h[1]):
                lses.append(self.comm.recv(((B, hq, T), DTYPES[int(h[2])]), s, OFFLOAD_TAG).to(q.device))
        if self.shard == "heads":
            return torch.cat(outs, 1)
        out, lse = merge(outs, lses)
        return (out, lse) if return_lse else out

    def free(self) -> None:
        """Drop this layer's caches on the servers."""
        for s in self.servers:
            self._send(s, _header(OP_FREE, self.layer))
        for s in self.servers:
            _recv_reply(self.comm, s)
        self._lens = [0] * self.B
        self.lengths = torch.zeros(self.B, dtype=torch.long, device=self.device)
