"""Mask specifications (DESIGN.md "Masks and biases are specifications, not tensors").

A spec says which (query, key) pairs may attend. Engines ask it for two things:

- `tile(b, h, q0, q1, k0, k1, n_q, n_k)`: a bool tensor broadcastable to `(B, H, q1-q0, k1-k0)`,
  True where attention is allowed;
- `tile_ranges(n_q, n_k, block_q)`: for each query tile `[q0, q0+block_q)`, a `Span(lo, hi, full_lo,
  full_hi)`: keys outside `[lo, hi)` are masked for every query of the tile (engines skip them), keys
  inside `[full_lo, full_hi)` are allowed for every query of the tile (engines need not mask them).
  Spans are conservative, never wrong: `[0, n_k)` with an empty full range is always valid.

Positions are bottom-right aligned: query `i` of `n_q` sits at key position `i + n_k - n_q` (as in
flash-attn >= 2.1 and decoding with a KV cache). Specs compose with `&` and `|`.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..validate import check_broadcast, check_tensor


class Span(NamedTuple):
    lo: int
    hi: int
    full_lo: int
    full_hi: int


def _clamp(x: int, n: int) -> int:
    return max(0, min(n, x))


def _span(lo: int, hi: int, full_lo: int, full_hi: int, n_k: int) -> Span:
    lo, hi = _clamp(lo, n_k), _clamp(hi, n_k)
    full_lo, full_hi = _clamp(full_lo, n_k), _clamp(full_hi, n_k)
    if hi <= lo:
        return Span(0, 0, 0, 0)
    full_lo, full_hi = max(full_lo, lo), min(full_hi, hi)
    if full_hi <= full_lo:
        full_lo = full_hi = lo
    return Span(lo, hi, full_lo, full_hi)


def _indices(q0, q1, k0, k1, device):
    q_idx = torch.arange(q0, q1, device=device).view(1, 1, -1, 1)
    kv_idx = torch.arange(k0, k1, device=device).view(1, 1, 1, -1)
    return q_idx, kv_idx


class Mask:
    """Base class of mask specifications."""

    def validate(self, B: int, H: int, n_q: int, n_k: int, device: torch.device) -> None:
        """Raise ValueError if the spec cannot apply to this problem."""

    def allowed(self, b, h, q_idx, kv_idx, n_q: int, n_k: int) -> torch.Tensor:
        """Evaluate on broadcast index tensors `(B|1, H|1, Tq, 1)`-style; returns bool."""
        raise NotImplementedError

    def tile(self, q0: int, q1: int, k0: int, k1: int, n_q: int, n_k: int, device) -> torch.Tensor:
        q_idx, kv_idx = _indices(q0, q1, k0, k1, device)
        b = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
        return self.allowed(b, b, q_idx, kv_idx, n_q, n_k)

    def span(self, q0: int, q1: int, n_q: int, n_k: int) -> Span:
        return Span(0, n_k, 0, 0)

    def tile_ranges(self, n_q: int, n_k: int, block_q: int) -> list[Span]:
        return [self.span(q0, min(q0 + block_q, n_q), n_q, n_k) for q0 in range(0, n_q, block_q)]

    def dense(self, B: int, H: int, n_q: int, n_k: int, device) -> torch.Tensor:
        """The whole mask as a bool tensor broadcastable to `(B, H, n_q, n_k)` (quadratic; for
        references and SDPA)."""
        return self.tile(0, n_q, 0, n_k, n_q, n_k, device)

    def __and__(self, other: "Mask") -> "Mask":
        return And(self, as_mask(other))

    def __or__(self, other: "Mask") -> "Mask":
        return Or(self, as_mask(other))


class Causal(Mask):
    """Causal mask. `align="bottom_right"` (default): query i sees keys `j <= i + n_k - n_q`;
    `align="top_left"`: `j <= i` (torch SDPA's `is_causal`). Identical when `n_q == n_k`."""

    def __init__(self, align: str = "bottom_right"):
        if align not in ("bottom_right", "top_left"):
            raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
        self.align = align

    def offset(self, n_q: int, n_k: int) -> int:
        return n_k - n_q if self.align == "bottom_right" else 0

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        q_idx, kv_idx = _indices(q0, q1, k0, k1, device)
        return kv_idx <= q_idx + self.offset(n_q, n_k)

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        return kv_idx <= q_idx + self.offset(n_q, n_k)

    def span(self, q0, q1, n_q, n_k):
        off = self.offset(n_q, n_k)
        return _span(0, q1 + off, 0, q0 + off + 1, n_k)

    def __repr__(self):
        return f"Causal(align={self.align!r})"


class SlidingWindow(Mask):
    """Query i (at key position `p = i + n_k - n_q`) sees keys `p - left <= j <= p + right`.
    `right=0` is a causal sliding window. `align` as in `Causal`."""

    def __init__(self, left: int, right: int = 0, align: str = "bottom_right"):
        for name, val in (("left", left), ("right", right)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"SlidingWindow {name} must be an int >= 0, got {val!r}")
        if align not in ("bottom_right", "top_left"):
            raise ValueError(f"align must be 'bottom_right' or 'top_left', got {align!r}")
        self.left, self.right, self.align = left, right, align

    def offset(self, n_q, n_k):
        return n_k - n_q if self.align == "bottom_right" else 0

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        p = q_idx + self.offset(n_q, n_k)
        return (kv_idx >= p - self.left) & (kv_idx <= p + self.right)

    def span(self, q0, q1, n_q, n_k):
        off = self.offset(n_q, n_k)
        return _span(q0 + off - self.left, q1 - 1 + off + self.right + 1,
                     q1 - 1 + off - self.left, q0 + off + self.right + 1, n_k)

    def __repr__(self):
        return f"SlidingWindow(left={self.left}, right={self.right})"


class KeyPadding(Mask):
    """Per-sequence key lengths `(B,)`: sequence b attends to keys `j < lengths[b]`. A length of 0
    makes every query of that sequence fully masked (output 0, LSE -inf)."""

    def __init__(self, lengths):
        if isinstance(lengths, (list, tuple)):
            lengths = torch.tensor(lengths, dtype=torch.long)  # host: from a Python list
        check_tensor("KeyPadding lengths", lengths, 1)
        if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"KeyPadding lengths must be an integer tensor, got {lengths.dtype}")
        self.lengths = lengths.long()
        self._minmax = None

    def validate(self, B, H, n_q, n_k, device):
        if self.lengths.shape[0] != B:
            raise ValueError(f"KeyPadding lengths must have shape (B,) = ({B},), got {tuple(self.lengths.shape)}")
        lo, hi = self._bounds()
        if lo < 0 or hi > n_k:
            raise ValueError(f"KeyPadding lengths must lie in [0, N_k = {n_k}], got values in [{lo}, {hi}]")

    def _bounds(self):
        if self._minmax is None:
            self._minmax = (int(self.lengths.min()), int(self.lengths.max()))
        return self._minmax

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        lengths = self.lengths.to(kv_idx.device)
        return kv_idx < lengths[b]

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        kv_idx = torch.arange(k0, k1, device=device)
        return (kv_idx.view(1, -1) < self.lengths.to(device).view(-1, 1)).view(-1, 1, 1, k1 - k0)

    def span(self, q0, q1, n_q, n_k):
        lo, hi = self._bounds()
        return _span(0, hi, 0, lo, n_k)

    def __repr__(self):
        return f"KeyPadding(lengths={self.lengths.tolist()})"


class Document(Mask):
    """Block-diagonal mask for packed sequences: query i sees key j iff they carry the same segment id.
    `segment_ids` `(N,)` or `(B, N)` integer; `kv_segment_ids` defaults to `segment_ids` (needed when
    `N_q != N_k`). Non-decreasing ids (contiguous documents) let engines skip other documents' tiles."""

    def __init__(self, segment_ids, kv_segment_ids=None):
        check_tensor("Document segment_ids", segment_ids)
        if kv_segment_ids is None:
            kv_segment_ids = segment_ids
        check_tensor("Document kv_segment_ids", kv_segment_ids)
        for name, t in (("segment_ids", segment_ids), ("kv_segment_ids", kv_segment_ids)):
            if t.dim() not in (1, 2):
                raise ValueError(f"Document {name} must have shape (N,) or (B, N), got {tuple(t.shape)}")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"Document {name} must be an integer tensor, got {t.dtype}")
        self.q_ids = segment_ids.long() if segment_ids.dim() == 2 else segment_ids.long().unsqueeze(0)
        self.k_ids = kv_segment_ids.long() if kv_segment_ids.dim() == 2 else kv_segment_ids.long().unsqueeze(0)
        self._sorted = None

    def validate(self, B, H, n_q, n_k, device):
        for name, t, n in (("segment_ids", self.q_ids, n_q), ("kv_segment_ids", self.k_ids, n_k)):
            if t.shape[-1] != n or t.shape[0] not in (1, B):
                raise ValueError(f"Document {name} must have shape (N,) or (B, N) with B = {B}, N = {n}, "
                                 f"got {tuple(t.shape)}")
            if t.device != device:
                raise ValueError(f"Document {name} must be on the inputs' device {device}, got {t.device}")

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        bq = b if self.q_ids.shape[0] > 1 else torch.zeros_like(b)
        bk = b if self.k_ids.shape[0] > 1 else torch.zeros_like(b)
        return self.q_ids[bq, q_idx] == self.k_ids[bk, kv_idx]

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        qs = self.q_ids[:, q0:q1].unsqueeze(1).unsqueeze(-1)
        ks = self.k_ids[:, k0:k1].unsqueeze(1).unsqueeze(-2)
        return qs == ks

    def _is_sorted(self):
        if self._sorted is None:
            self._sorted = bool((self.q_ids[:, 1:] >= self.q_ids[:, :-1]).all()
                                and (self.k_ids[:, 1:] >= self.k_ids[:, :-1]).all())
        return self._sorted

    def tile_ranges(self, n_q, n_k, block_q):
        starts = list(range(0, n_q, block_q))
        if not self._is_sorted():
            return [Span(0, n_k, 0, 0) for _ in starts]
        q0 = torch.tensor(starts, device=self.q_ids.device)
        q1 = torch.clamp(q0 + block_q, max=n_q) - 1
        first, last = self.q_ids[:, q0], self.q_ids[:, q1]  # (Bq, T)
        k_ids = self.k_ids.expand(max(self.k_ids.shape[0], first.shape[0]), -1).contiguous()
        first = first.expand(k_ids.shape[0], -1).contiguous()
        last = last.expand(k_ids.shape[0], -1).contiguous()
        lo = torch.searchsorted(k_ids, first, right=False).amin(0)
        hi = torch.searchsorted(k_ids, last, right=True).amax(0)
        single = (first == last).all(0)
        flo = torch.searchsorted(k_ids, first, right=False).amax(0)
        fhi = torch.searchsorted(k_ids, first, right=True).amin(0)
        fhi = torch.where(single, fhi, flo)
        rows = torch.stack([lo, hi, flo, fhi], 1).tolist()
        return [_span(a, b, c, d, n_k) for a, b, c, d in rows]

    def __repr__(self):
        return f"Document(segments={tuple(self.q_ids.shape)})"


class Dense(Mask):
    """An explicit bool mask broadcastable to `(B, H, N_q, N_k)`, True = attend."""

    def __init__(self, mask):
        check_tensor("mask", mask)
        if mask.dtype != torch.bool:
            if mask.dtype.is_floating_point and torch.isnan(mask).any():
                raise ValueError("mask contains NaN; a mask must be a bool tensor (True = attend)")
            raise TypeError(f"mask must be a bool tensor (True = attend), got dtype {mask.dtype}; "
                            "pass an additive float mask as bias= instead")
        if mask.dim() > 4:
            raise ValueError(f"mask must have at most 4 dims (B, H, N_q, N_k), got shape {tuple(mask.shape)}")
        self.mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))

    def validate(self, B, H, n_q, n_k, device):
        check_broadcast("mask", tuple(self.mask.shape), (B, H, n_q, n_k), "(B, H, N_q, N_k)")
        if self.mask.device != device:
            raise ValueError(f"mask must be on the inputs' device {device}, got {self.mask.device}")

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        m = self.mask
        z = torch.zeros_like
        return m[b if m.shape[0] > 1 else z(b), h if m.shape[1] > 1 else z(h),
                 q_idx if m.shape[2] > 1 else z(q_idx), kv_idx if m.shape[3] > 1 else z(kv_idx)]

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        m = self.mask
        qs = slice(q0, q1) if m.shape[2] > 1 else slice(None)
        ks = slice(k0, k1) if m.shape[3] > 1 else slice(None)
        return m[:, :, qs, ks]

    def tile_ranges(self, n_q, n_k, block_q):
        m = self.mask.expand(-1, -1, n_q, n_k)
        spans = []
        cols_any = []
        for q0 in range(0, n_q, block_q):
            cols_any.append(m[:, :, q0:q0 + block_q].any(dim=2).any(dim=1).any(dim=0))
        cols = torch.stack(cols_any)  # (T, n_k)
        idx = torch.arange(n_k, device=cols.device)
        big = torch.full_like(idx, n_k)
        lo = torch.where(cols, idx, big).amin(1)
        hi = torch.where(cols, idx + 1, torch.zeros_like(idx)).amax(1)
        for a, b in torch.stack([lo, hi], 1).tolist():
            spans.append(_span(a, b, 0, 0, n_k))
        return spans

    def dense(self, B, H, n_q, n_k, device):
        return self.mask

    def __repr__(self):
        return f"Dense(shape={tuple(self.mask.shape)})"


class MaskMod(Mask):
    """A FlexAttention-style callable `(b, h, q_idx, kv_idx) -> bool`, evaluated on broadcast index
    tensors (raw query and key indices). Gives no tile ranges: every tile is evaluated."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise TypeError(f"mask_mod must be callable, got {type(fn).__name__}")
        self.fn = fn
        self._bh = None

    def allowed(self, b, h, q_idx, kv_idx, n_q, n_k):
        out = self.fn(b, h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor) or out.dtype != torch.bool:
            raise TypeError(f"mask_mod must return a bool tensor, got "
                            f"{out.dtype if isinstance(out, torch.Tensor) else type(out).__name__}")
        return out

    def tile(self, q0, q1, k0, k1, n_q, n_k, device):
        q_idx, kv_idx = _indices(q0, q1, k0, k1, device)
        b, h = self._bh if self._bh is not None else (torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device),) * 2
        return self.allowed(b, h, q_idx, kv_idx, n_q, n_k)

    def validate(self, B, H, n_q, n_k, device):
        """Bind batch and head index tensors so the callable may depend on b and h."""
        self._bh = (torch.arange(B, device=device).view(-1, 1, 1, 1), torch.arange(H, device=device).view(1, -1, 1, 1))
        zero = torch.zeros((1, 1, 1, 1), dtype=torch.long, device=device)
        probe = self.allowed(*self._bh, zero, zero, n_q, n_k)
        check_broadcast("mask_mod output", tuple(probe.shape), (B, H, 1, 1), "(B, H, N_q, N_k)")

    def __repr__(self):
        return f"MaskMod({getattr(self.fn, '__name__', 'fn')})"


class And(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def validate(self, *args):
        self.a.validate(*args)
        self.b.validate(*args)

    def allowed(self, *args):
        return self.a.allowed(*args) & self.b.allowed(*args)

    def tile(self, *args):
        return self.a.tile(*args) & self.b.tile(*args)

    def tile_ranges(self, n_q, n_k, block_q):
        out = []
        for x, y in zip(self.a.tile_ranges(n_q, n_k, block_q), self.b.tile_ranges(n_q, n_k, block_q)):
            out.append(_span(max(x.lo, y.lo), min(x.hi, y.hi),
                             max(x.full_lo, y.full_lo), min(x.full_hi, y.full_hi), n_k))
        return out

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


class Or(Mask):
    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    def validate(self, *args):
        self.a.validate(*args)
        self.b.validate(*args)

    def allowed(self, *args):
        return self.a.allowed(*args) | self.b.allowed(*args)

    def tile(self, *args):
        return self.a.tile(*args) | self.b.tile(*args)

    def tile_ranges(self, n_q, n_k, block_q):
        out = []
        for x, y in zip(self.a.tile_ranges(n_q, n_k, block_q), self.b.tile_ranges(n_q, n_k, block_q)):
            if x.hi <= x.lo:
                out.append(y)
                continue
            if y.hi <= y.lo:
                out.append(x)
                continue
            fx, fy = x.full_hi - x.full_lo, y.full_hi - y.full_lo
            full = (x.full_lo, x.full_hi) if fx >= fy else (y.full_lo, y.full_hi)
            out.append(_span(min(x.lo, y.lo), max(x.hi, y.hi), full[0], full[1], n_k))
        return out

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


def as_mask(mask) -> Mask | None:
    """Normalize the `mask=` argument: None, a spec, a bool tensor (Dense) or a mask_mod callable."""
    if mask is None or isinstance(mask, Mask):
        return mask
    if isinstance(mask, torch.Tensor):
        return Dense(mask)
    if callable(mask):
        return MaskMod(mask)
    raise TypeError(f"mask must be None, an anyattn.masks spec, a bool tensor or a mask_mod callable, "
                    f"got {type(mask).__name__}")

