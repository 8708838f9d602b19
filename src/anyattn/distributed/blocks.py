"""One block of sharded softmax attention: rank r's queries against the keys of rank s.

The block splits into rectangles, one per (query segment, key segment) of the two ranks' layouts (1 x 1
for contiguous and stripe, 2 x 2 for zigzag). The global mask's ranges (`GlobalSpans`) classify each:

- "empty": no query sees any key: skipped (no compute; the communication still happens);
- "full": every query sees every key (or the keys are trimmed to the range that is full): unmasked;
- "causal": a causal mask on identical query and key runs: causal in local coordinates;
- "masked": anything else (and any bias): the `blocked` engine with the global specs seen on the
  rectangle (`anyattn.subblock.BlockMask` / `BlockBias`), which skips empty tiles itself.

"full" and "causal" rectangles without bias run the CPU flash kernel (`softmax.sdpa.flash_block_*`) on
CPU tensors; elsewhere the `blocked` engine. Forward gives per query
segment `(out, lse)` (rectangles of a segment merged by `anyattn.lse.merge`); backward takes the rows'
*final* `out` and `lse` and returns this block's share of dq, dk, dv and the bias gradients. Everything
is computed in the work dtype (float32, or float64 for float64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import torch

from ..lse import merge
from ..masks import Causal
from ..softmax.blocked import DEFAULT_BLOCK_K, blocked_attention, blocked_block_backward
from ..softmax.sdpa import flash_block_backward, flash_block_forward
from ..subblock import BlockBias, BlockMask, GlobalSpans, Run
from ..validate import Shape
from .layout import Layout

ENGINE_BLOCK_Q = 256


@dataclass(frozen=True)
class Rect:
    """Local query rows `[q0, q1)` of the query rank against local key rows `[k0, k1)` of the key rank;
    `q_run` / `k_run`: their global positions; kind: "full", "causal" or "masked"."""

    q0: int
    q1: int
    k0: int
    k1: int
    q_run: Run
    k_run: Run
    kind: str


def _block_size(chunk: int, target: int = ENGINE_BLOCK_Q) -> int:
    """A query tile dividing the chunk (so engine tiles align with the global spec's tiles), near target."""
    if chunk <= target:
        return chunk
    best = max(d for d in range(1, target + 1) if chunk % d == 0)
    return best if best >= target // 4 else target


@dataclass
class Problem:
    """The global problem behind one sharded attention call (the same on every rank)."""

    layout: Layout
    mask: object
    bias: object
    scale: float
    B: int
    H: int
    H_kv: int
    D: int
    D_v: int
    device: torch.device
    work: torch.dtype
    block_q: int = 0
    spans: GlobalSpans | None = None
    _plans: dict = field(default_factory=dict)

    def __post_init__(self):
        lay = self.layout
        if lay.kind == "stripe":
            self.block_q = min(ENGINE_BLOCK_Q, lay.n_local)
            span_block = self.block_q * lay.world_size
        else:
            self.block_q = _block_size(lay.chunk)
            span_block = self.block_q
        if self.mask is not None:
            self.spans = GlobalSpans(self.mask, lay.n_global, lay.n_global, span_block)

    @property
    def groups(self) -> int:
        return self.H // self.H_kv

    def plan(self, q_rank: int, k_rank: int) -> list[Rect]:
        """The non-empty rectangles of block (q_rank, k_rank), cached."""
        key = (q_rank, k_rank)
        if key not in self._plans:
            self._plans[key] = self._plan(q_rank, k_rank)
        return self._plans[key]

    def _plan(self, q_rank, k_rank):
        lay = self.layout
        if q_rank == k_rank and type(self.mask) is Causal and self.bias is None:
            # Same positions, increasing: the global causal mask is the local causal mask (one call).
            n = lay.n_local
            return [Rect(0, n, 0, n, None, None, "causal")]
        rects = []
        for qs in lay.segments(q_rank):
            q_run = Run(qs.start, qs.count, qs.step)
            for ks in lay.segments(k_rank):
                k_run = Run(ks.start, ks.count, ks.step)
                lo, hi, kind = 0, ks.count, "full"
                if self.mask is not None:
                    sp = self.spans.over(q_run.start, q_run.start + q_run.step * (q_run.count - 1) + 1)
                    lo, hi = k_run.first_at_or_after(sp.lo), k_run.first_at_or_after(sp.hi)
                    flo, fhi = k_run.first_at_or_after(sp.full_lo), k_run.first_at_or_after(sp.full_hi)
                    if hi <= lo:
                        continue
                    if not (flo <= lo and hi <= fhi):
                        kind = "causal" if type(self.mask) is Causal and q_run == k_run else "masked"
                        if kind == "causal":
                            lo, hi = 0, ks.count
                if self.bias is not None:
                    kind = "masked"
                rects.append(Rect(qs.local_start, qs.local_start + qs.count, ks.local_start + lo,
                                  ks.local_start + hi, q_run, k_run.sub(lo, hi), kind))
        return _coalesce(rects)

    def _specs(self, rect: Rect, heads: tuple):
        H, N = self.H, self.layout.n_global
        mask = None if self.mask is None else BlockMask(self.mask, rect.q_run, rect.k_run, self.B, H, N, N, heads,
                                                        self.spans)
        bias = None if self.bias is None else BlockBias(self.bias, rect.q_run, rect.k_run, self.B, H, N, N, heads,
                                                        self.device)
        return mask, bias

    def _shape(self, rect: Rect, hkv: int) -> Shape:
        return Shape(self.B, hkv * self.groups, hkv, rect.q1 - rect.q0, rect.k1 - rect.k0, self.D, self.D_v)

    def _flash(self, rect: Rect) -> bool:
        return rect.kind in ("full", "causal") and self.device.type == "cpu"  # the CPU flash op

    # ---------------------------------------------------------------------------------- forward
    def block_forward(self, rects: list, q, k, v, heads: tuple):
        """q `(B, h, n_local, D)` (the heads `heads` of the query rank, work dtype), k/v the key rank's
        block for the matching KV heads. Returns `[(q0, q1, out, lse)]` per query segment."""
        per_seg: dict = {}
        hkv = k.shape[1]
        for rect in rects:
            qr = q[:, :, rect.q0:rect.q1]
            kr, vr = k[:, :, rect.k0:rect.k1], v[:, :, rect.k0:rect.k1]
            if self._flash(rect):
                o, l = flash_block_forward(qr, kr, vr, rect.kind == "causal", self.scale)
            else:
                mask, bias = self._specs(rect, heads)
                if rect.kind == "causal":
                    mask = Causal("top_left")
                elif rect.kind == "full":
                    mask = None
                o, l = blocked_attention(qr, kr, vr, mask, bias, self.scale, self._shape(rect, hkv),
                                         block_q=self.block_q, block_k=DEFAULT_BLOCK_K)
            per_seg.setdefault((rect.q0, rect.q1), []).append((o, l))
        out = []
        for (q0, q1), parts in per_seg.items():
            if len(parts) == 1:
                out.append((q0, q1) + parts[0])
            else:
                o, l = merge([p[0] for p in parts], [p[1] for p in parts])
                out.append((q0, q1, o, l))
        return out

    # ---------------------------------------------------------------------------------- backward
    def block_backward(self, rects: list, q, k, v, out, lse, dout, dlse, heads: tuple, dq, dkv, dbias):
        """Add this block's gradients: dq `(B, h, n_local, D)` (query rank's rows), dkv `(B, h_kv, n_local,
        D + D_v)` (the key rank's rows: dk then dv), dbias a list (one entry per bias tensor, None until
        touched). out / lse / dout / dlse are the query rank's final rows (dlse may be None)."""
        hkv = k.shape[1]
        D = self.D
        for rect in rects:
            rows = slice(rect.q0, rect.q1)
            keys = slice(rect.k0, rect.k1)
            qr, kr, vr = q[:, :, rows], k[:, :, keys], v[:, :, keys]
            o, l, do = out[:, :, rows], lse[:, :, rows], dout[:, :, rows]
            dl = None if dlse is None else dlse[:, :, rows]
            if self._flash(rect):
                a, b, c = flash_block_backward(qr, kr, vr, o, l, do, dl, rect.kind == "causal", self.scale)
                grads = ()
            else:
                mask, bias = self._specs(rect, heads)
                if rect.kind == "causal":
                    mask = Causal("top_left")
                elif rect.kind == "full":
                    mask = None
                a, b, c, grads = blocked_block_backward(qr, kr, vr, o, l, do, dl, mask, bias, self.scale,
                                                        self._shape(rect, hkv), self.block_q, DEFAULT_BLOCK_K)
            dq[:, :, rows] += a
            dkv[:, :, keys, :D] += b
            dkv[:, :, keys, D:] += c
            for i, g in enumerate(grads):
                if g is not None:
                    dbias[i] = g if dbias[i] is None else dbias[i] + g

    # ---------------------------------------------------------------------------------- accounting
    def active_work(self, q_rank: int, k_rank: int, tile: int) -> int:
        """Active (tile x tile) blocks of block (q_rank, k_rank): the query x key tiles holding at least one
        pair the mask's ranges say may be allowed (what the engines compute; for load-balance reports)."""
        total = 0
        for rect in self.plan(q_rank, k_rank):
            nq, nk = rect.q1 - rect.q0, rect.k1 - rect.k0
            if rect.kind == "full" or self.mask is None:
                total += -(-nq // tile) * -(-nk // tile)
                continue
            if rect.kind == "causal":
                spec = Causal("top_left")
            else:
                spec = BlockMask(self.mask, rect.q_run, rect.k_run, self.B, self.H, self.layout.n_global,
                                 self.layout.n_global, None, self.spans)
            for sp in spec.tile_ranges(nq, nk, tile):
                if sp.hi > sp.lo:
                    total += -(-sp.hi // tile) - sp.lo // tile
        return total


def _coalesce(rects: list) -> list:
    """Join "full" rectangles that touch in local coordinates (same rows and adjacent keys, or same keys
    and adjacent rows: zigzag's off-diagonal blocks), so one kernel call covers them (their runs are not
    needed: full rectangles use no spec)."""
    out = list(rects)
    changed = True
    while changed:
        changed = False
        for i, a in enumerate(out):
            for j, b in enumerate(out):
                if i == j or a.kind != "full" or b.kind != "full":
                    continue
                if (a.q0, a.q1) == (b.q0, b.q1) and a.k1 == b.k0:
                    joined = Rect(a.q0, a.q1, a.k0, b.k1, a.q_run, None, "full")
                elif (a.k0, a.k1) == (b.k0, b.k1) and a.q1 == b.q0:
                    joined = Rect(a.q0, b.q1, a.k0, a.k1, None, a.k_run, "full")
                else:
                    continue
                out = [r for n, r in enumerate(out) if n not in (i, j)] + [joined]
                changed = True
                break
            if changed:
                break
    return sorted(out, key=lambda r: (r.q0, r.k0))


def merge_rows(out: torch.Tensor, lse: torch.Tensor, q0: int, q1: int, o: torch.Tensor, l: torch.Tensor,
               first: bool) -> None:
    """Merge a partial result for rows [q0, q1) into the accumulators (in place); `first`: rows untouched."""
    if first:
        out[:, :, q0:q1] = o
        lse[:, :, q0:q1] = l
        return
    m_o, m_l = merge([out[:, :, q0:q1], o], [lse[:, :, q0:q1], l])
    out[:, :, q0:q1] = m_o
    lse[:, :, q0:q1] = m_l
