"""`KVCache`: a preallocated per-layer key/value cache for a batch of sequences with their own lengths.

Layout: keys `(B, H_kv, capacity, D)`, values `(B, H_kv, capacity, D_v)`; sequence b holds
`lengths[b]` tokens at positions `[0, lengths[b])` (the `masks.KeyPadding` semantics). Grouped-query
attention: any number of query heads that is a multiple of H_kv reads it (see `anyattn.decode`).

Options (they compose):
- `policy="tokenselect"` (or a `TokenSelect(...)`): `decode` attends to a selected subset of tokens
  (see `tokenselect.py`); the selection state lives in the cache.
- `compress="pca", projection=PCAProjection`: keys and values are stored as centered coordinates in
  per-head PCA bases with `r_k`, `r_v` dims (see `pca.py`); heads with equal ranks share one buffer.
- `quantize="int8"`: stored values are int8 with one float32 absmax scale per token and head
  (see `int8.py`), dequantized inside the decode step.

Operations: `append(k, v, n_new=None)`, `truncate(lengths)`, `reorder(index)` (beam search),
`reset()`, and accounting: `nbytes()` (allocated), `bytes_per_token()`, `stored_bytes()`.
The capacity grows (doubling) when an append needs more room, unless `grow=False`.
"""
from __future__ import annotations

import torch

from ..validate import FLOAT_DTYPES, check_positive_int, check_tensor
from . import int8 as _int8
from .pca import PCAProjection
from .tokenselect import TokenSelect


class _Group:
    """KV heads stored together: `heads` (their indices), stored dims d_k, d_v, buffers and, with
    compression, the projection slices."""

    def __init__(self, heads, d_k, d_v, proj, cache):
        self.heads = list(heads)
        self.all_heads = self.heads == list(range(cache.H_kv))
        dev = cache.device
        self.heads_t = torch.tensor(self.heads, dtype=torch.long, device=dev)
        self.d_k, self.d_v = d_k, d_v
        self.proj = None
        if proj is not None:
            pdt = cache.proj_dtype
            hs = self.heads_t.cpu()  # host: indexes host-side projection tables
            self.proj = (proj.basis_k[hs][:, :, :d_k].to(dev, pdt).contiguous(), proj.mu_k[hs].to(dev, pdt),
                         proj.basis_v[hs][:, :, :d_v].to(dev, pdt).contiguous(), proj.mu_v[hs].to(dev, pdt))
        self.k = self.v = self.k_scale = self.v_scale = None
        self._scratch = {}

    def allocate(self, B, cap, cache, copy_old=False, keep=0):
        h, dev = len(self.heads), cache.device
        sdt = torch.int8 if cache.quantize == "int8" else cache.dtype
        k = torch.zeros(B, h, cap, self.d_k, dtype=sdt, device=dev)
        v = torch.zeros(B, h, cap, self.d_v, dtype=sdt, device=dev)
        ks = vs = None
        if cache.quantize == "int8":
            ks = torch.zeros(B, h, cap, dtype=torch.float32, device=dev)
            vs = torch.zeros(B, h, cap, dtype=torch.float32, device=dev)
        if copy_old and keep > 0:
            k[:, :, :keep] = self.k[:, :, :keep]
            v[:, :, :keep] = self.v[:, :, :keep]
            if ks is not None:
                ks[:, :, :keep] = self.k_scale[:, :, :keep]
                vs[:, :, :keep] = self.v_scale[:, :, :keep]
        self.k, self.v, self.k_scale, self.v_scale = k, v, ks, vs

    def buffers(self):
        return [t for t in (self.k, self.v, self.k_scale, self.v_scale) if t is not None]

    def encode(self, k, v, cache):
        """Original-space k `(B, H_kv, T, D)`, v -> stored form for this group's heads:
        `(k, v, k_scale, v_scale)` (scales None without int8)."""
        if not self.all_heads:
            k, v = k.index_select(1, self.heads_t), v.index_select(1, self.heads_t)
        if self.proj is not None:
            Uk, mk, Uv, mv = self.proj
            pdt = cache.proj_dtype
            k = (k.to(pdt) - mk[None, :, None]) @ Uk[None]
            v = (v.to(pdt) - mv[None, :, None]) @ Uv[None]
        if cache.quantize == "int8":
            (kq, ks), (vq, vs) = _int8.quantize(k), _int8.quantize(v)
            return kq, vq, ks, vs
        return k.to(cache.dtype), v.to(cache.dtype), None, None

    def scratch(self, name, shape, dtype, use):
        """A work buffer reused across steps when `use` (inference), else None (allocate fresh). Reusing it
        avoids allocating (and page-faulting) megabytes at every decoding step."""
        if not use:
            return None
        n = 1
        for x in shape:
            n *= x
        t = self._scratch.get(name)
        if t is None or t.numel() < n or t.dtype != dtype or t.device != self.k.device:
            t = torch.empty(n, dtype=dtype, device=self.k.device)
            self._scratch[name] = t
        return t[:n].view(shape)

    def _deq(self, x, s, cache, name, use, out=None):
        """int8 `x (..., d)` with scales `s (...)` -> compute dtype, into `out` or a scratch buffer when `use`."""
        if out is None:
            out = self.scratch(name, tuple(x.shape), cache.dtype, use)
        if out is None:
            return _int8.dequantize(x, s, cache.dtype)
        out.copy_(x)
        return out.mul_(s.unsqueeze(-1))

    def read(self, lo, hi, cache, scratch=False):
        """Dequantized stored keys/values for positions `[lo, hi)`: `(B, h, hi-lo, d_k)`, `(..., d_v)` (views
        of the buffers without int8)."""
        k, v = self.k[:, :, lo:hi], self.v[:, :, lo:hi]
        if self.k_scale is None:
            return k, v
        return (self._deq(k, self.k_scale[:, :, lo:hi], cache, "rk", scratch),
                self._deq(v, self.v_scale[:, :, lo:hi], cache, "rv", scratch))

    def read_keys(self, lo, hi, cache, scratch=False):
        k = self.k[:, :, lo:hi]
        if self.k_scale is None:
            return k
        return self._deq(k, self.k_scale[:, :, lo:hi], cache, "rk", scratch)

    def gather(self, idx, cache, scratch=False, out=None):
        """idx `(B, S)` positions -> dequantized `(B, h, S, d_k)`, `(B, h, S, d_v)`; written into `out` (a pair of
        such tensors) when given."""
        # Rows of the flattened (B * h * capacity, d) buffer: index_select copies whole contiguous rows, far
        # faster on CPU than torch.gather with an index expanded over d.
        B, S = idx.shape
        h, cap = len(self.heads), self.k.shape[2]
        base = (torch.arange(B, device=idx.device)[:, None] * h + torch.arange(h, device=idx.device)[None, :]) * cap
        flat = (base[:, :, None] + idx[:, None, :]).reshape(-1)
        quant = self.k_scale is not None

        def take(src, name, width, dst=None):
            rows = src.view(-1, width) if width else src.view(-1)
            shape = (flat.numel(), width) if width else (flat.numel(),)
            buf = dst.view(shape) if dst is not None else self.scratch(name, shape, src.dtype, scratch or quant)
            got = rows.index_select(0, flat) if buf is None else torch.index_select(rows, 0, flat, out=buf)
            return got.view((B, h, S, width) if width else (B, h, S))

        ok, ov = (None, None) if out is None else out
        if not quant:
            return take(self.k, "gk", self.d_k, ok), take(self.v, "gv", self.d_v, ov)
        k, v = take(self.k, "gk", self.d_k), take(self.v, "gv", self.d_v)
        ks, vs = take(self.k_scale, "gks", 0), take(self.v_scale, "gvs", 0)
        return self._deq(k, ks, cache, "dk", scratch, ok), self._deq(v, vs, cache, "dv", scratch, ov)


class KVCache:
    """Preallocated key/value cache of one attention layer for a batch of sequences.

    batch_size B, num_kv_heads H_kv, max_len (initial capacity in tokens), head_dim D,
    v_head_dim D_v (default D); dtype: the compute dtype of keys/values (float64/32/bf16/fp16);
    policy: None (exact decoding), "tokenselect" or a `TokenSelect(...)`;
    compress: None or "pca" (with `projection=`, a `PCAProjection` fitted for this layer; its ranks
    set the stored dims) - a `PCAProjection` may also be passed as `compress` directly;
    quantize: None or "int8"; grow: reallocate (doubling) when an append exceeds the capacity.

    Write the new tokens' keys/values with `append` before calling `anyattn.decode` for them.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 v_head_dim: int | None = None, *, dtype: torch.dtype = torch.float32, device=None,
                 policy=None, compress=None, projection: PCAProjection | None = None, quantize=None,
                 grow: bool = True):
        self.B = check_positive_int("batch_size", batch_size)
        self.H_kv = check_positive_int("num_kv_heads", num_kv_heads)
        self.capacity = check_positive_int("max_len", max_len)
        self.D = check_positive_int("head_dim", head_dim)
        self.D_v = check_positive_int("v_head_dim", head_dim if v_head_dim is None else v_head_dim)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.proj_dtype = torch.promote_types(dtype, torch.float32)
        if not isinstance(grow, bool):
            raise TypeError(f"grow must be a bool, got {type(grow).__name__}")
        self.grow = grow

        if policy is None or policy == "exact":
            self.policy = None
        elif policy == "tokenselect":
            self.policy = TokenSelect()
        elif isinstance(policy, TokenSelect):
            self.policy = policy
        else:
            raise ValueError(f"policy must be None, 'exact', 'tokenselect' or a TokenSelect, got {policy!r}")

        if isinstance(compress, PCAProjection):
            compress, projection = "pca", compress
        if compress is None:
            if projection is not None:
                raise ValueError("projection= is only used with compress='pca'")
            self.projection = None
        elif compress == "pca":
            if not isinstance(projection, PCAProjection):
                raise ValueError(f"compress='pca' needs projection=PCAProjection (from fit_pca / PCACalibrator), "
                                 f"got {type(projection).__name__}")
            if (projection.num_kv_heads, projection.head_dim, projection.v_head_dim) != (self.H_kv, self.D, self.D_v):
                raise ValueError(f"projection must be fitted for (H_kv, D, D_v) = ({self.H_kv}, {self.D}, {self.D_v}), "
                                 f"got ({projection.num_kv_heads}, {projection.head_dim}, {projection.v_head_dim})")
            self.projection = projection
        else:
            raise ValueError(f"compress must be None or 'pca', got {compress!r}")

        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        self.quantize = quantize

        if self.projection is None:
            self.groups = [_Group(range(self.H_kv), self.D, self.D_v, None, self)]
        else:
            self.groups = [_Group(hs, rk, rv, self.projection, self)
                           for hs, rk, rv in self.projection.groups()]
            p = self.proj_dtype
            self._mu_k = self.projection.mu_k.to(self.device, p)  # (H_kv, D) for the LSE correction
        for g in self.groups:
            g.allocate(self.B, self.capacity, self)
        self._lens = [0] * self.B
        self.lengths = torch.zeros(self.B, dtype=torch.long, device=self.device)
        self.selection = None  # TokenSelect state, see tokenselect.py
        self.stats = {"selections": 0, "reuses": 0}

    # ------------------------------------------------------------------------------------ info
    @property
    def max_length(self) -> int:
        """The longest sequence's length."""
        return max(self._lens) if self._lens else 0

    @property
    def uniform(self) -> bool:
        """All sequences have the same length."""
        return min(self._lens) == max(self._lens)

    def lengths_list(self) -> list[int]:
        return list(self._lens)

    def nbytes(self) -> int:
        """Bytes allocated for keys, values and scales (capacity, not length)."""
        return sum(t.numel() * t.element_size() for g in self.groups for t in g.buffers())

    def bytes_per_token(self) -> int:
        """Stored bytes per token of one sequence (all KV heads, keys + values + scales)."""
        per = 0
        for g in self.groups:
            for t in g.buffers():
                per += (t.numel() // (t.shape[0] * t.shape[2])) * t.element_size()
        return per

    def stored_bytes(self) -> int:
        """Bytes holding the tokens currently in the cache (`bytes_per_token * sum(lengths)`)."""
        return self.bytes_per_token() * sum(self._lens)

    def __repr__(self):
        opts = [f"policy={type(self.policy).__name__ if self.policy else None}",
                f"compress={'pca' if self.projection is not None else None}", f"quantize={self.quantize}"]
        return (f"KVCache(B={self.B}, H_kv={self.H_kv}, D={self.D}, D_v={self.D_v}, dtype={self.dtype}, "
                f"capacity={self.capacity}, lengths={self._lens}, {', '.join(opts)})")

    # ------------------------------------------------------------------------------------ updates
    def _set_lengths(self, lens):
        self._lens = [int(x) for x in lens]
        self.lengths = torch.tensor(self._lens, dtype=torch.long, device=self.device)

    def _reserve(self, need: int):
        if need <= self.capacity:
            return
        if not self.grow:
            raise ValueError(f"KVCache is full: appending needs {need} positions but max_len = {self.capacity} "
                             "(grow=False)")
        cap = max(need, 2 * self.capacity)
        keep = self.max_length
        for g in self.groups:
            g.allocate(self.B, cap, self, copy_old=True, keep=keep)
        self.capacity = cap

    def append(self, k: torch.Tensor, v: torch.Tensor, n_new=None) -> None:
        """Write new tokens. k `(B, H_kv, T, D)`, v `(B, H_kv, T, D_v)` in the cache's dtype and device;
        n_new: None (all T tokens for every sequence) or `(B,)` ints <= T: sequence b appends its first
        `n_new[b]` tokens at positions `lengths[b], ...`."""
        check_tensor("k", k, 4)
        check_tensor("v", v, 4)
        B, H, T, D = k.shape
        if (B, H, D) != (self.B, self.H_kv, self.D):
            raise ValueError(f"k must have shape (B={self.B}, H_kv={self.H_kv}, T, D={self.D}), got {tuple(k.shape)}")
        if tuple(v.shape) != (self.B, self.H_kv, T, self.D_v):
            raise ValueError(f"v must have shape (B={self.B}, H_kv={self.H_kv}, T={T}, D_v={self.D_v}), "
                             f"got {tuple(v.shape)}")
        for name, x in (("k", k), ("v", v)):
            if x.dtype != self.dtype:
                raise ValueError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
            if x.device != self.device:
                raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")
        if n_new is None:
            n = [T] * self.B
        else:
            if isinstance(n_new, torch.Tensor):
                n = [int(x) for x in n_new.reshape(-1).tolist()]
            else:
                n = [int(x) for x in n_new]
            if len(n) != self.B or any(x < 0 or x > T for x in n):
                raise ValueError(f"n_new must hold B = {self.B} counts in [0, T = {T}], got {n}")
        if T == 0 or max(n) == 0:
            return
        k, v = k.detach(), v.detach()  # the cache holds values, not graph (decode is differentiable in q)
        new = [a + b for a, b in zip(self._lens, n)]
        self._reserve(max(new))
        uniform = self.uniform and min(n) == max(n)
        if uniform:
            L0, t = self._lens[0], n[0]
            for g in self.groups:
                parts = g.encode(k[:, :, :t], v[:, :, :t], self)
                for buf, x in zip(g.buffers(), parts):
                    buf[:, :, L0:L0 + t] = x
        else:
            b_idx = torch.tensor([b for b in range(self.B) for _ in range(n[b])], dtype=torch.long, device=self.device)
            t_idx = torch.tensor([t for b in range(self.B) for t in range(n[b])], dtype=torch.long, device=self.device)
            p_idx = torch.tensor([self._lens[b] + t for b in range(self.B) for t in range(n[b])], dtype=torch.long,
                                 device=self.device)
            for g in self.groups:
                parts = g.encode(k, v, self)
                for buf, x in zip(g.buffers(), parts):
                    # buf (B, h, cap, ...) at [b, :, p] <- x (B, h, T, ...) at [b, :, t]
                    buf.transpose(1, 2)[b_idx, p_idx] = x.transpose(1, 2)[b_idx, t_idx]
        self._set_lengths(new)

    def truncate(self, lengths) -> None:
        """Shorten sequences: `lengths` an int (all) or `(B,)` ints, each <= the current length (speculative
        decoding rollback, sliding restarts). Resets the token-selection state."""
        if isinstance(lengths, int) and not isinstance(lengths, bool):
            new = [lengths] * self.B
        elif isinstance(lengths, torch.Tensor) or isinstance(lengths, (list, tuple)):
            new = [int(x) for x in (lengths.reshape(-1).tolist() if isinstance(lengths, torch.Tensor) else lengths)]
        else:
            raise TypeError(f"lengths must be an int or a sequence / tensor of B ints, got {type(lengths).__name__}")
        if len(new) != self.B:
            raise ValueError(f"lengths must hold B = {self.B} values, got {len(new)}")
        for b, (a, c) in enumerate(zip(new, self._lens)):
            if a < 0 or a > c:
                raise ValueError(f"truncate can only shorten: lengths[{b}] must lie in [0, {c}], got {a}")
        self._set_lengths(new)
        self.selection = None

    def reorder(self, index) -> None:
        """Reorder / select / repeat sequences (beam search): new sequence i is old sequence `index[i]`.
        index: `(B',)` integer tensor or list; the batch size becomes B'."""
        if not isinstance(index, torch.Tensor):
            index = torch.tensor(list(index), dtype=torch.long)  # host: a Python list, moved below
        check_tensor("index", index, 1)
        if index.dtype.is_floating_point or index.dtype == torch.bool:
            raise TypeError(f"index must be an integer tensor, got {index.dtype}")
        idx = index.to(self.device).long()
        il = idx.tolist()
        if len(il) == 0 or min(il) < 0 or max(il) >= self.B:
            raise ValueError(f"index must hold at least one value in [0, B = {self.B}), got {il}")
        for g in self.groups:
            g.k, g.v = g.k.index_select(0, idx), g.v.index_select(0, idx)
            if g.k_scale is not None:
                g.k_scale, g.v_scale = g.k_scale.index_select(0, idx), g.v_scale.index_select(0, idx)
        self.B = len(il)
        self._set_lengths([self._lens[i] for i in il])
        if self.selection is not None:
            self.selection = self.selection.index_select(idx)

    def reset(self) -> None:
        """Empty every sequence (keeps the allocation)."""
        self._set_lengths([0] * self.B)
        self.selection = None

    # ------------------------------------------------------------------------------------ reads
    def reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values as decoding sees them, back in the original space: `(B, H_kv, L_max, D)`,
        `(B, H_kv, L_max, D_v)` (dequantized, back-projected plus means; positions past a sequence's
        length are meaningless). For inspecting the compression error."""
        L = self.max_length
        k = torch.zeros(self.B, self.H_kv, L, self.D, dtype=self.proj_dtype, device=self.device)
        v = torch.zeros(self.B, self.H_kv, L, self.D_v, dtype=self.proj_dtype, device=self.device)
        for g in self.groups:
            kg, vg = g.read(0, L, self)
            kg, vg = kg.to(self.proj_dtype), vg.to(self.proj_dtype)
            if g.proj is not None:
                Uk, mk, Uv, mv = g.proj
                kg = kg @ Uk.transpose(1, 2)[None] + mk[None, :, None]
                vg = vg @ Uv.transpose(1, 2)[None] + mv[None, :, None]
            k[:, g.heads_t], v[:, g.heads_t] = kg, vg
        return k.to(self.dtype), v.to(self.dtype)
