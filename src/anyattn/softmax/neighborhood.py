"""Neighborhood attention in 1-D, 2-D and 3-D with NATTEN's semantics (METHODS.md "Neighborhood
attention"; Hassani et al., "Neighborhood Attention Transformer", CVPR 2023; "Dilated Neighborhood
Attention Transformer", 2022), forward and backward on every device.

The engine reduces neighborhood attention to dense attention of query tiles over key halos
(`anyattn.softmax.halo_tiles`):

1. dilation: each axis of n points is viewed as `(ceil(n/d), d)` and the d interleaved groups are
   attended separately (group coordinates; groups of unequal size are padded, and masked);
2. queries are cut into tiles of `T_1 x ... x T_m` grid points (T a multiple of the stride); the
   *halo* of a tile is the box of keys its windows reach, `hk_a ~ T_a + k_a - s_a` points per axis,
   starting per tile where its first window starts (at the borders NATTEN's windows shift inward, and
   so do the halos: a border tile computes no more than an inner one);
3. the computed area per query is `prod(hk_a) / prod(T_a)` keys against the window's `prod(k_a)`;
   `default_tiles` chooses T from the kernel size, stride and dilation to bring that ratio close to 1
   while keeping the tile's matmuls efficient (a cost model; `anyattn tune` measures it);
4. in 1-D the halos of the inner tiles (whose windows do not shift) are overlapping views of the keys,
   and one `(Tq, Hk)` mask serves them all; the few border tiles, and in 2-D / 3-D all tiles, get
   their halos gathered (one copy) and their own masks. The per-tile bool mask encodes shifted border
   windows, even kernels, stride leaders, causal axes and dilation groups of unequal size;
5. outputs are untiled; additional key/value tokens are attended separately and merged by LSE
   (`anyattn.lse.merge`).

Backward is the halo engine's (recompute per group; halo gradients added back in place). Memory is
O(N prod(hk_a) / prod(T_a)) at most (gathered halos), nothing quadratic in N. Plans (masks, halo
starts) are cached per configuration. bf16 / fp16 inputs run bf16 matmuls with fp32 softmax
statistics (`anyattn.precision`).

Backends: "auto" (the halo engine), "sdpa" (the same tiles through one torch SDPA call with the
per-tile mask: the CPU flash kernel, with its LSE on CPU) and "blocked" (anyattn's blocked engine).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..backends import Choice
from ..backends import natten as natten_backend
from ..lse import merge
from ..masks import Dense
from ..masks.neighborhood import group_sizes, normalize_args, window
from ..precision import matmul_dtype
from ..tune import entry, neighborhood_key
from ..validate import Shape, check_qkv, check_same_device_dtype, check_scale, check_tensor
from .blocked import blocked_attention
from .halo_tiles import GROUP_ELEMENTS, Group, additive, group_size, halo_attention
from .sdpa import lse_supported, sdpa_attention

BACKENDS = ("auto", "sdpa", "blocked", "natten")

#: default_tiles' cost of a tile of Tq query rows, relative to its score entries: `1 + TILE_OVERHEAD / Tq`
#: (small tiles make short matmuls; measured on CPU, see docs/neighborhood.md). bf16 matmuls run 4x faster,
#: so the per-tile overheads weigh more: larger tiles win (1-D k=257: T=128 in bf16, 32-64 in fp32).
TILE_OVERHEAD = 16.0
TILE_OVERHEAD_LOW_PRECISION = 48.0
#: ... and of gathering one key (and value) row for the inner axes' halos, in score entries (measured: a
#: gathered row costs about as much as 20-40 score entries on the 2-core CPU)
GATHER_COST = 40.0
MAX_TILE_QUERIES = 512


@dataclass(frozen=True, eq=False)
class _Axis:
    """Tiling of one spatial axis. n: size; d: dilation; T: query tile (group coordinates); nt: tiles;
    hk: halo length; start `(d, nt)`: first halo key of each tile (group coordinates); ng: points of the
    largest group."""

    n: int
    d: int
    T: int
    nt: int
    hk: int
    start: torch.Tensor
    ng: int


def _axis_plan(n, k, d, s, causal, T, device):
    """Plan one axis; its mask `(d, nt, T, hk)`: True where query `t*T + i` of group g may see key
    `start[g, t] + j` of the same group."""
    ng = -(-n // d)
    nt = -(-ng // T)
    g = torch.arange(d, device=device).view(d, 1, 1)
    t = torch.arange(nt, device=device).view(1, nt, 1)
    c = t * T + torch.arange(T, device=device).view(1, 1, T)
    size = group_sizes(n, d, g)
    c = torch.minimum(c, size - 1)  # padded queries behave as the group's last query (never empty rows)
    lo, hi = window(c, size, k, s, causal)
    start = lo.amin(-1)
    hk = int((hi.amax(-1) - start).max()) + 1
    # Halos end inside their group where it is long enough (border tiles span less than hk: start earlier).
    start = torch.minimum(start, (size.view(d, 1) - hk).clamp(min=0))
    y = start.view(d, nt, 1, 1) + torch.arange(hk, device=device).view(1, 1, 1, hk)
    mask = (y >= lo.unsqueeze(-1)) & (y <= hi.unsqueeze(-1))
    return _Axis(n, d, T, nt, hk, start, ng), mask


@lru_cache(maxsize=256)
def default_tiles(shape, kernel_size, dilation, stride, low_precision: bool = False):
    """Query tile per axis (group coordinates, a multiple of the stride) minimizing a cost model: score
    entries (query rows x halo keys, halo `min(T + k - s, n_g)` per axis) times `1 + TILE_OVERHEAD / Tq`,
    plus, in 2-D / 3-D, the inner axes' halo gather (`GATHER_COST` per gathered key row), for tiles of at
    most `MAX_TILE_QUERIES` queries whose scores fit a cache-sized group. low_precision: bf16 matmuls
    (`TILE_OVERHEAD_LOW_PRECISION`)."""
    m = len(shape)
    overhead = TILE_OVERHEAD_LOW_PRECISION if low_precision else TILE_OVERHEAD
    cands = []
    for n, k, d, s in zip(shape, kernel_size, dilation, stride):
        ng = -(-n // d)
        top = -(-ng // s) * s  # one tile covers the axis
        # stride multiples that are powers of two or multiples of 16 (aligned matmul rows), or the whole axis
        cands.append(sorted({top} | {T for T in (s * j for j in range(1, 257)) if T < top and (T & (T - 1) == 0 or T % 16 == 0)}))
    best, best_cost = None, math.inf

    def rec(a, chosen):
        nonlocal best, best_cost
        if a == m:
            tq = math.prod(chosen)
            rows, hk = 1.0, 1
            for T, n, k, d, s in zip(chosen, shape, kernel_size, dilation, stride):
                ng = -(-n // d)
                rows *= -(-ng // T) * T * d
                hk *= min(T + k - s, ng)
            if tq * hk > 2 * GROUP_ELEMENTS and tq > 1:
                return
            # inner axes: every key is copied hk_a / T_a times per axis (the halo gather)
            copies = math.prod(min(T + k - s, -(-n // d)) / T for T, n, k, d, s in
                               zip(chosen[1:], shape[1:], kernel_size[1:], dilation[1:], stride[1:]))
            cost = rows * hk * (1.0 + overhead / tq) + (rows * copies * GATHER_COST if m > 1 else 0.0)
            if cost < best_cost:
                best, best_cost = tuple(chosen), cost
            return
        for T in cands[a]:
            if math.prod(chosen) * T > MAX_TILE_QUERIES:
                break  # candidates are sorted
            rec(a + 1, chosen + [T])

    rec(0, [])
    return best


def _tile_order(m: int) -> list:
    """Order of the tile axes in the flattened tile index: inner axes first, the first spatial axis last."""
    return list(range(1, m)) + [0]


def _product(parts, combine):
    """Per-axis tensors `(d_a, nt_a, X_a, Y_a)` -> `(prod d * prod nt, prod X, prod Y)`, tiles ordered
    `(d.., nt..)`, X and Y row-major over the axes."""
    m = len(parts)
    full = None
    for a, part in enumerate(parts):
        view = [1] * (4 * m)
        for j, size in enumerate(part.shape):
            view[j * m + a] = size
        p = part.view(view)
        full = p if full is None else combine(full, p)
    return full.reshape(math.prod(full.shape[:2 * m]), math.prod(full.shape[2 * m:3 * m]), -1)


@dataclass(eq=False)
class _Plan:
    """One configuration, in the layout of the halo engine.

    Tiles of a (batch, head) block are ordered `(r, t)`: `r = (d_1.., d_m, nt_2.., nt_m)` indexes the
    first axis's dilation group and the inner tiles (`R` of them, `R_in = R / d_1` inner ones), `t` the
    first-axis tile. Keys live in a buffer `(B * H_kv, R, S, Hk_in, C)`: for each r, the `S` rows of
    its first-axis group, each row the inner halo (`Hk_in = hk_2 * .. * hk_m` keys) of its inner tile; the
    halo of tile (r, t) is rows `[start[g_1, t], start[g_1, t] + hk_1)` of r.
    rows `(R, S, Hk_in)`: grid index of every buffer key (clamped into the grid where the halo leaves it:
    those keys are masked). m1 `(d_1, nt_1, T_1, hk_1)` and inner `(R_in, T_in, Hk_in)`: bool masks of the
    first axis and of the inner axes; a tile's mask is their product. inner_range: per g_1, the tiles
    `[e0, e1)` whose halos start `T_1` rows apart and share the first-axis mask (attended through views
    of the buffer); the other tiles are the first axis's border tiles."""

    axes: tuple
    R: int
    S: int
    rows: torch.Tensor
    m1: torch.Tensor
    inner: torch.Tensor
    inner_range: list
    _cache: dict = field(default_factory=dict)

    @property
    def tq(self) -> int:
        return math.prod(ax.T for ax in self.axes)

    @property
    def hk(self) -> int:
        return math.prod(ax.hk for ax in self.axes)

    @property
    def hk_in(self) -> int:
        return self.inner.shape[2]

    def masks(self, g1, t, r_in0, r_in1):
        """Bool masks `(r_in1 - r_in0, Tq, Hk)` of tiles `(g1, r_in, t)`."""
        a = self.m1[g1, t]  # (T_1, hk_1)
        b = self.inner[r_in0:r_in1]  # (n, T_in, Hk_in)
        n, t_in, h_in = b.shape
        full = a.view(1, a.shape[0], 1, a.shape[1], 1) & b.view(n, 1, t_in, 1, h_in)
        return full.reshape(n, self.tq, self.hk)

    def additive(self, key, dtype, make):
        """Cached additive mask `make()` -> 0 / -inf in `dtype`."""
        k = (key, dtype)
        if k not in self._cache:
            self._cache[k] = additive(make(), dtype)
        return self._cache[k]


_CACHE: "OrderedDict[tuple, _Plan]" = OrderedDict()
_CACHE_SIZE = 4


def _plan(shape, ks, ds, ss, cs, tiles, device) -> _Plan:
    key = (shape, ks, ds, ss, cs, tiles, str(device))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    m = len(shape)
    axes, masks = [], []
    for n, k, d, s, c, T in zip(shape, ks, ds, ss, cs, tiles):
        ax, mk = _axis_plan(n, k, d, s, c, T, device)
        axes.append(ax)
        masks.append(mk)
    a0 = axes[0]
    # First-axis rows per group: every halo ends inside (S > ng only when a group is shorter than hk).
    S = max(a0.hk, a0.ng)
    grid_strides = [math.prod(shape[a + 1:]) for a in range(m)]

    def coords(a, y):  # group coordinates y `(d, ...)` of axis a -> clamped grid index * grid stride
        ax = axes[a]
        g = torch.arange(ax.d, device=device).view((ax.d,) + (1,) * (y.dim() - 1))
        return (y * ax.d + g).clamp(0, ax.n - 1) * grid_strides[a]

    # rows: (d_1, [d_a, nt_a]_{a>1}, S, [hk_a]_{a>1}) -> (R, S, Hk_in)
    lead = [a0.d] + [ax.d for ax in axes[1:]] + [ax.nt for ax in axes[1:]]
    rows = coords(0, torch.arange(S, device=device).view(1, S).expand(a0.d, S))  # (d_1, S)
    rows = rows.view([a0.d] + [1] * (2 * (m - 1)) + [S] + [1] * (m - 1))
    for a in range(1, m):
        ax = axes[a]
        y = ax.start.unsqueeze(-1) + torch.arange(ax.hk, device=device)  # (d_a, nt_a, hk_a)
        view = [1] * (2 * m - 1 + 1 + (m - 1))
        view[a], view[m - 1 + a], view[2 * m - 1 + a] = ax.d, ax.nt, ax.hk
        rows = rows + coords(a, y).view(view)
    R = math.prod(lead)
    rows = rows.expand(*lead, S, *[ax.hk for ax in axes[1:]]).reshape(R, S, -1)
    if m > 1:
        inner = _product(masks[1:], torch.logical_and)
    else:
        inner = torch.ones(1, 1, 1, dtype=torch.bool, device=device)
    inner_range = []
    for g in range(a0.d):
        same = [bool(torch.equal(masks[0][g, t], masks[0][g, a0.nt // 2])) for t in range(a0.nt)]
        off = (a0.start[g] - torch.arange(a0.nt, device=device) * a0.T).tolist()
        mid = a0.nt // 2
        e0, e1 = mid, mid + 1
        while e0 > 0 and same[e0 - 1] and off[e0 - 1] == off[mid]:
            e0 -= 1
        while e1 < a0.nt and same[e1] and off[e1] == off[mid]:
            e1 += 1
        inner_range.append((e0, e1))
    plan = _Plan(tuple(axes), R, S, rows, masks[0], inner, inner_range)
    _CACHE[key] = plan
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return plan


def _pad_axes(x: torch.Tensor, pads) -> torch.Tensor:
    """Pad (or crop, for negative amounts) the spatial axes of `(B, H, *spatial, C)` in one copy;
    pads: `(left, right)` per spatial axis."""
    if all(p == (0, 0) for p in pads):
        return x
    flat = [0, 0]
    for left, right in reversed(pads):
        flat += [left, right]
    return F.pad(x, flat)


def _tile_queries(x, axes):
    """(B, H, n_1..n_m, C) -> (B*H, n_tiles, T_1*..*T_m, C); tiles ordered (d.., nt_2.., nt_1)."""
    B, H, C = x.shape[0], x.shape[1], x.shape[-1]
    m = len(axes)
    x = _pad_axes(x, [(0, ax.nt * ax.T * ax.d - ax.n) for ax in axes])
    x = x.reshape(B, H, *[s for ax in axes for s in (ax.nt, ax.T, ax.d)], C)
    perm = [0, 1] + [2 + 3 * a + 2 for a in range(m)] + [2 + 3 * a for a in _tile_order(m)] + \
        [2 + 3 * a + 1 for a in range(m)] + [2 + 3 * m]
    x = x.permute(perm)
    return x.reshape(B * H, -1, math.prod(ax.T for ax in axes), C)


def _untile(x, B, H, axes):
    """(B*H, n_tiles, T_1*..*T_m, C) -> (B, H, n_1..n_m, C)."""
    m = len(axes)
    C = x.shape[-1]
    order = _tile_order(m)
    x = x.reshape(B, H, *[ax.d for ax in axes], *[axes[a].nt for a in order], *[ax.T for ax in axes], C)
    perm = [0, 1] + [p for a in range(m) for p in (2 + m + order.index(a), 2 + 2 * m + a, 2 + a)] + [2 + 3 * m]
    x = x.permute(perm).reshape(B, H, *[ax.nt * ax.T * ax.d for ax in axes], C)
    return x[(slice(None), slice(None)) + tuple(slice(0, ax.n) for ax in axes)]


def _key_buffer(x, plan):
    """Keys `(B, H_kv, *spatial, C)` -> the plan's flat buffer `(B * H_kv, R, S, Hk_in, C)` (one row
    gather; a view when it would be the identity)."""
    B, H, C = x.shape[0], x.shape[1], x.shape[-1]
    N = math.prod(x.shape[2:-1])
    x = x.reshape(B * H, N, C)
    if plan.rows.numel() == N and len(plan.axes) == 1 and plan.axes[0].d == 1:
        return x.reshape(-1)  # 1-D, no dilation, no padding: the keys themselves
    return x.index_select(1, plan.rows.reshape(-1)).reshape(-1)


def _groups(plan, BH, G, D, D_v, dtype):
    """The halo engine's groups: per (batch, head) block, the inner tiles of each r in cache-sized runs
    (halos `T_1` rows apart, one mask), and the border tiles of the first axis across r (halos `S` rows
    apart, a mask per tile). Query block b reads key block `b // G`."""
    a0 = plan.axes[0]
    R, S, nt, hk_in = plan.R, plan.S, a0.nt, plan.hk_in
    R_in = R // a0.d
    rk, rv = hk_in * D, hk_in * D_v  # elements per buffer row
    size = group_size(plan.tq, plan.hk)
    start = a0.start.tolist()
    out = []
    for g1, (e0, e1) in enumerate(plan.inner_range):
        for ri in range(R_in):
            mk = plan.additive(("inner", g1, ri), dtype, lambda: plan.masks(g1, e0, ri, ri + 1))
            r = g1 * R_in + ri
            for bh in range(BH):
                pq, pk = bh * R + r, (bh // G) * R + r
                for t0 in range(e0, e1, size):
                    row = pk * S + start[g1][t0]
                    out.append(Group(pq * nt + t0, min(size, e1 - t0), 1, row * rk, a0.T * rk, row * rv, a0.T * rv, mk))
        for t in [t for t in range(nt) if not e0 <= t < e1]:
            for r0 in range(0, R_in, size):
                r1 = min(R_in, r0 + size)
                mk = plan.additive(("border", g1, t, r0), dtype, lambda: plan.masks(g1, t, r0, r1))
                for bh in range(BH):
                    pq, pk = bh * R + g1 * R_in + r0, (bh // G) * R + g1 * R_in + r0
                    row = pk * S + start[g1][t]
                    out.append(Group(pq * nt + t, r1 - r0, nt, row * rk, S * rk, row * rv, S * rv, mk))
    return out


def _tiles_engine(plan, q, k, v, scale, need_lse):
    """Run the halo engine; returns out `(B*H, n_tiles, Tq, D_v)` and lse `(B*H, n_tiles, Tq)` or None."""
    B, H, H_kv, D, D_v = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    qt = _tile_queries(q, plan.axes)  # (BH, R * nt_1, Tq, D)
    n_tiles = qt.shape[1]
    groups = _groups(plan, B * H, H // H_kv, D, D_v, q.dtype)
    out, lse = halo_attention(groups, plan.hk, scale, qt.reshape(-1, plan.tq, D), _key_buffer(k, plan),
                              _key_buffer(v, plan), D_v, need_lse)
    return out.view(B * H, n_tiles, plan.tq, D_v), (lse.view(B * H, n_tiles, plan.tq) if lse is not None else None)


def _fused(plan, q, k, v, scale, need_lse, backend):
    """All (tile, halo) pairs through one exact-attention call with the per-tile mask: torch SDPA (the CPU
    flash kernel, with its LSE on CPU) or anyattn's `blocked` engine. Returns out `(B*H, n_tiles, Tq, D_v)`
    and lse or None."""
    B, H, H_kv, D, D_v = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    G, tq, hk = H // H_kv, plan.tq, plan.hk
    a0 = plan.axes[0]
    R_in = plan.R // a0.d
    qt = _tile_queries(q, plan.axes)
    nt = qt.shape[1]
    # buffer row of every halo key, tiles (r, t): r * S + start[g_1, t] + j
    r = torch.arange(plan.R, device=q.device)
    first = (r * plan.S).view(-1, 1, 1) + a0.start[r // R_in].unsqueeze(-1) + torch.arange(a0.hk, device=q.device)
    idx = first.reshape(-1)  # (R * nt_1 * hk_1)
    mask = torch.cat([torch.stack([plan.masks(g1, t, 0, R_in) for t in range(a0.nt)], 1).reshape(-1, tq, hk)
                      for g1 in range(a0.d)])

    def halos(x):
        C = x.shape[-1]
        buf = _key_buffer(x, plan).view(B * H_kv, plan.R * plan.S, plan.hk_in * C)
        h = buf.index_select(1, idx).view(B, H_kv, nt, hk, C)
        return (h if G == 1 else h.repeat_interleave(G, 1)).reshape(B * H, nt, hk, C)

    kt, vt = halos(k), halos(v)
    tshape = Shape(B * H, nt, nt, tq, hk, D, D_v)
    if backend == "blocked" or (need_lse and not lse_supported(q.device, q.dtype)):
        return blocked_attention(qt, kt, vt, Dense(mask.unsqueeze(0)), None, scale, tshape, block_q=tq, block_k=hk)
    fmask = additive(mask, q.dtype)
    if need_lse or D != D_v:  # the CPU flash kernel (with a differentiable LSE), or padded head dims
        return sdpa_attention(qt, kt, vt, fmask, False, scale, tshape, need_lse)
    # No row is empty (every query sees itself), so the plain SDPA call needs no fix-up.
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=fmask, scale=scale), None


def _check_inputs(q, k, v, additional_k, additional_v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if q.dim() not in (4, 5, 6):
        raise ValueError(f"q must have shape (B, H, *spatial, D) with 1 to 3 spatial axes (4 to 6 dims), "
                         f"got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.dim() != q.dim():
            raise ValueError(f"{name} must have q's number of dimensions {q.dim()}, got shape {tuple(x.shape)}")
    B, H, *spatial, D = q.shape
    sk, sv = tuple(k.shape[2:-1]), tuple(v.shape[2:-1])
    if sk != tuple(spatial) or sv != tuple(spatial):
        raise ValueError(f"k and v must have q's spatial shape {tuple(spatial)}, got k: {sk}, v: {sv}")
    # The rest (dtype, device, batch, heads, head dims, non-empty) is the flattened-sequence contract.
    shape = check_qkv(q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2))
    H_kv, D_v = shape.H_kv, shape.D_v
    if (additional_k is None) != (additional_v is None):
        raise ValueError("additional_k and additional_v must be given together, got "
                         f"additional_k={'a tensor' if additional_k is not None else None}, "
                         f"additional_v={'a tensor' if additional_v is not None else None}")
    n_add = 0
    if additional_k is not None:
        check_tensor("additional_k", additional_k, 4)
        check_tensor("additional_v", additional_v, 4)
        check_same_device_dtype("q", q, additional_k=additional_k, additional_v=additional_v)
        n_add = additional_k.shape[2]
        if tuple(additional_k.shape) != (B, H_kv, n_add, D) or n_add == 0:
            raise ValueError(f"additional_k must have shape (B, H_kv, N_add, D) = ({B}, {H_kv}, N_add >= 1, {D}), "
                             f"got {tuple(additional_k.shape)}")
        if tuple(additional_v.shape) != (B, H_kv, n_add, D_v):
            raise ValueError(f"additional_v must have shape (B, H_kv, N_add, D_v) = ({B}, {H_kv}, {n_add}, {D_v}), "
                             f"got {tuple(additional_v.shape)}")
    return B, H, H_kv, tuple(spatial), D, D_v, n_add


def neighborhood(q, k, v, kernel_size, dilation=1, stride=1, is_causal=False, *, additional_k=None,
                 additional_v=None, scale=None, return_lse=False, tile=None, backend="auto"):
    """Neighborhood attention (NATTEN semantics) over 1, 2 or 3 spatial axes, forward and backward.

    q `(B, H, *spatial, D)`, k `(B, H_kv, *spatial, D)`, v `(B, H_kv, *spatial, D_v)`, `H % H_kv == 0`,
    spatial = `(n_1[, n_2[, n_3]])`. Per axis (int or per-axis tuple): kernel_size k (the window holds
    exactly k keys: windows shift at the borders), dilation d (attention inside the d interleaved
    groups), stride s (queries in blocks of s share the window of their block's leader), is_causal
    (keys up to the query, no shifting). Requires `k * d <= n` and `s <= k` on every axis.
    additional_k `(B, H_kv, N_add, D)`, additional_v `(B, H_kv, N_add, D_v)`: extra tokens that every
    query also attends (merged by log-sum-exp). scale defaults to `D ** -0.5`.
    tile: query tile per axis in dilation-group coordinates (default: `tuned_tiles`, i.e. `anyattn tune`'s
    measurement for this configuration if there is one, else `default_tiles`); backend: "auto" (NATTEN's
    fused kernels on CUDA when installed, else the halo engine; see `backend_choice`), "natten", "sdpa" (one
    torch SDPA call over all tiles; LSE where `sdpa.lse_supported`) or "blocked" (anyattn's blocked engine
    over all tiles).

    Returns out `(B, H, *spatial, D_v)`, or `(out, lse)` with lse `(B, H, *spatial)` when return_lse.
    Reference: Hassani et al., "Neighborhood Attention Transformer" (CVPR 2023) and "Dilated
    Neighborhood Attention Transformer" (2022); NATTEN's `na1d/na2d/na3d` (layout `(B, *spatial, H, D)`).
    """
    B, H, H_kv, spatial, D, D_v, n_add = _check_inputs(q, k, v, additional_k, additional_v)
    ks, ds, ss, cs = normalize_args(spatial, kernel_size, dilation, stride, is_causal)
    scale = check_scale(scale, D)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    use_natten = backend == "natten" or (backend == "auto" and tile is None
                                          and natten_backend.unavailable(q) is None)
    if use_natten:
        why = natten_backend.unavailable(q)
        if why is not None:
            raise ValueError(f"backend='natten' cannot run here: {why}")
        out, lse = natten_backend.neighborhood(q, k, v, ks, ds, ss, cs, scale=scale, additional_k=additional_k,
                                               additional_v=additional_v, return_lse=return_lse)
        return (out, lse) if return_lse else out
    m = len(spatial)
    if tile is None:
        tiles = tuned_tiles(tuple(spatial), ks, ds, ss, cs, q.dtype, q.device)
    else:
        tiles = tuple(tile) if isinstance(tile, (list, tuple)) else (tile,) * m
        if len(tiles) != m or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiles):
            raise ValueError(f"tile must be a positive int or a sequence of {m} positive ints, got {tile!r}")
    dtype = q.dtype
    need_lse = return_lse or n_add > 0
    plan = _plan(spatial, ks, ds, ss, cs, tiles, q.device)
    if backend == "auto":
        md = matmul_dtype(dtype, q.device)
        out_t, lse_t = _tiles_engine(plan, q.to(md), k.to(md), v.to(md), scale, need_lse)
    else:
        work = dtype if backend == "sdpa" else torch.promote_types(dtype, torch.float32)
        out_t, lse_t = _fused(plan, q.to(work), k.to(work), v.to(work), scale, need_lse, backend)
    out = _untile(out_t, B, H, plan.axes)
    lse = _untile(lse_t.unsqueeze(-1), B, H, plan.axes).squeeze(-1) if lse_t is not None else None
    if n_add:
        N = math.prod(spatial)
        qf = q.reshape(B, H, N, D)
        ashape = Shape(B, H, H_kv, N, n_add, D, D_v)
        if lse_supported(q.device, q.dtype) and backend == "sdpa":
            out_a, lse_a = sdpa_attention(qf, additional_k, additional_v, None, False, scale, ashape, True)
        else:
            out_a, lse_a = blocked_attention(qf, additional_k, additional_v, None, None, scale, ashape)
        out_f, lse_f = merge([out.reshape(B, H, N, D_v), out_a.to(out.dtype)],
                             [lse.reshape(B, H, N), lse_a.to(lse.dtype)])
        out = out_f.reshape(B, H, *spatial, D_v)
        lse = lse_f.reshape(B, H, *spatial)
    out = out.to(dtype)
    if return_lse:
        return out, lse
    return out


def backend_choice(q, return_lse: bool = False) -> Choice:
    """Which implementation `neighborhood(..., backend="auto")` uses for inputs like q, and why."""
    why = natten_backend.unavailable(q)
    if why is None:
        return Choice("natten", f"NATTEN's fused kernels on {q.device.type} (installed; layout converted)")
    return Choice("anyattn", f"anyattn's engine: query tiles x key halos (NATTEN not used: {why})")


def tuned_tiles(shape, ks, ds, ss, cs, dtype, device):
    """The query tile for this configuration: `anyattn tune`'s measured best if the tune cache has this
    configuration (see `anyattn.tune`), else `default_tiles`."""
    rec = entry("neighborhood_tile", neighborhood_key(shape, ks, ds, ss, cs, dtype, device))
    if rec is not None and len(rec["value"]) == len(shape):
        return tuple(int(t) for t in rec["value"])
    return default_tiles(tuple(shape), ks, ds, ss, matmul_dtype(dtype, device) in (torch.bfloat16, torch.float16))


def explain_tiles(req) -> str:
    """How the engine tiles a `method="neighborhood"` request: the tile and where it comes from."""
    spec = req.mask
    key = neighborhood_key(spec.shape, spec.kernel_size, spec.dilation, spec.stride, spec.is_causal, req.q.dtype,
                           req.q.device)
    rec = entry("neighborhood_tile", key)
    if rec is not None:
        quoted = ", ".join(f"{t} {ms:.1f} ms" for t, ms in sorted(rec.get("measured", {}).items(), key=lambda x: x[1]))
        return f"tile {tuple(rec['value'])} measured by `anyattn tune` ({quoted})"
    tiles = tuned_tiles(spec.shape, spec.kernel_size, spec.dilation, spec.stride, spec.is_causal, req.q.dtype,
                        req.q.device)
    return f"tile {tiles} from the built-in cost model (no tune-cache entry for {key})"


# ---------------------------------------------------------------- `anyattn.attention(method="neighborhood")`
def _supports(req) -> str | None:
    from ..masks.neighborhood import Neighborhood
    if not isinstance(req.mask, Neighborhood):
        return f"mask {req.mask!r} is not a masks.Neighborhood spec"
    if req.bias is not None:
        return "a bias is not supported by the neighborhood engine (use method='blocked')"
    return None


def _run(req, tile=None, backend="auto"):
    """Flattened `(B, H, N, D)` request with a `masks.Neighborhood` spec -> the grid engine."""
    reason = _supports(req)
    if reason is not None:
        raise ValueError(f"method='neighborhood' cannot run this request: {reason}")
    spec, sh = req.mask, req.shape
    grid = lambda x: x.reshape(x.shape[0], x.shape[1], *spec.shape, x.shape[-1])  # noqa: E731
    res = neighborhood(grid(req.q), grid(req.k), grid(req.v), spec.kernel_size, spec.dilation, spec.stride,
                       spec.is_causal, scale=req.scale, return_lse=req.return_lse, tile=tile, backend=backend)
    out, lse = res if req.return_lse else (res, None)
    out = out.reshape(sh.B, sh.H, sh.N_q, sh.D_v)
    return out, (lse.reshape(sh.B, sh.H, sh.N_q) if lse is not None else None)


def _register():
    from ..registry import Method, register
    register(Method("neighborhood", True, "neighborhood attention for masks.Neighborhood: query tiles x key "
                    "halos in one fused SDPA call; O(N) memory forward and backward", _supports, _run,
                    {"tile": "query tile per axis (default: a cost model)",
                     "backend": "'auto', 'natten', 'sdpa' or 'blocked'"}))


_register()
