"""Neighborhood attention in 1-D, 2-D and 3-D with NATTEN's semantics (METHODS.md "Neighborhood
attention"; Hassani et al., "Neighborhood Attention Transformer", CVPR 2023; "Dilated Neighborhood
Attention Transformer", 2022), forward and backward on every device.

The engine reduces neighborhood attention to one batched exact-attention call on small dense problems:

1. dilation becomes a batch dimension: each axis of n points is viewed as `(ceil(n/d), d)` and the d
   interleaved groups are attended separately (zero padding where `n % d != 0`, masked);
2. queries are cut into tiles of `T_1 x ... x T_m` grid points (T a multiple of the stride, so a
   tile's windows are a compact set); for each tile the key *halo* it needs, a box of
   `hk_a ~ T_a + k_a - 1` points per axis, is cut out of the (padded) keys with `Tensor.unfold`
   (a view in 1-D, one copy in 2-D/3-D);
3. all (tile, halo) pairs run at once through exact attention with the small per-tile bool mask
   (which encodes shifted border windows, even kernels, stride leaders, causal axes, dilation groups
   of unequal size): on CPU the fused flash kernel of torch SDPA with its log-sum-exp
   (`anyattn.softmax.sdpa.sdpa_attention`), elsewhere torch SDPA, or the `blocked` engine when the LSE
   is needed;
4. outputs are untiled; additional key/value tokens are attended separately and merged by LSE
   (`anyattn.lse.merge`).

Gradients flow through autograd (the flash kernel's backward, unfold/pad/permute backward). Memory is
O(N (T + k - 1)^m / T^m) in forward and backward: nothing quadratic in N is allocated. Masks are
cached per configuration.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import lru_cache
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backends import Choice
from ..backends import natten as natten_backend
from ..lse import merge
from ..masks import Dense
from ..masks.neighborhood import group_sizes, normalize_args, window
from ..validate import Shape, check_qkv, check_same_device_dtype, check_scale, check_tensor
from .blocked import blocked_attention
from .sdpa import lse_supported, sdpa_attention

BACKENDS = ("auto", "sdpa", "blocked", "natten")


@dataclass(frozen=True)
class _Axis:
    """Tiling of one spatial axis. n: size; d: dilation; T: query tile (group coordinates); nt: tiles;
    pl: halo offset left of a tile's first query; hk: halo length; L: padded group length for keys."""

    n: int
    d: int
    T: int
    nt: int
    pl: int
    hk: int

    @property
    def L(self) -> int:
        return (self.nt - 1) * self.T + self.hk


def _axis_mask(n, k, d, s, causal, T, device):
    """Plan one axis and build its mask `(d, nt, T, hk)`: True where query `t*T + i` of group g may see
    key `t*T - pl + j` of the same group."""
    ng_max = -(-n // d)
    nt = -(-ng_max // T)
    g = torch.arange(d, device=device).view(d, 1, 1)
    t = torch.arange(nt, device=device).view(1, nt, 1)
    c = t * T + torch.arange(T, device=device).view(1, 1, T)
    ng = group_sizes(n, d, g)
    c = torch.minimum(c, ng - 1)  # padded queries behave as the group's last query (never empty rows)
    lo, hi = window(c, ng, k, s, causal)
    base = t.view(1, nt) * T
    pl = max(0, int((base - lo.amin(-1)).max()))
    start = base - pl
    hk = int((hi.amax(-1) - start).max()) + 1
    y = start.view(1, nt, 1, 1) + torch.arange(hk, device=device).view(1, 1, 1, hk)
    mask = (y >= lo.unsqueeze(-1)) & (y <= hi.unsqueeze(-1))
    return _Axis(n, d, T, nt, pl, hk), mask


@lru_cache(maxsize=256)
def default_tiles(shape, kernel_size, dilation, stride):
    """Query tile per axis (group coordinates, a multiple of the stride), minimizing a cost model of the
    batched problem: query rows x halo keys, with a penalty for short tiles (per-tile overhead; CPU
    flash attention works on blocks of 32 query rows) and for the halo copy of the inner axes (the
    first axis is a view). At most 512 queries per tile."""
    m = len(shape)
    cands = []
    for a, (n, k, d, s) in enumerate(zip(shape, kernel_size, dilation, stride)):
        ng = -(-n // d)
        top = -(-ng // s) * s  # one tile covers the axis
        opts = {top} | {s * j for j in range(1, 257) if s * j < top}
        if m == 1:
            opts = {T for T in opts if T % 32 == 0 or T == top or T < 32} if top > 32 else opts
        cands.append(sorted(T for T in opts if T <= 512))
    best, best_cost = None, math.inf

    def rec(a, chosen):
        nonlocal best, best_cost
        if a == m:
            tq = math.prod(chosen)
            if tq > 512:
                return
            rows, keys, copies = 1.0, 1.0, 1.0
            for i, (T, n, k, d) in enumerate(zip(chosen, shape, kernel_size, dilation)):
                ng = -(-n // d)
                rows *= -(-ng // T) * T * d
                hk = min(T + k - 1, ng)
                keys *= hk
                if i > 0:
                    copies *= hk / T
            qrows = -(-tq // 32) * 32 if m == 1 else tq
            cost = rows * keys * (qrows / tq) * (1.0 + 48.0 / tq) + (rows * copies * 24.0 if m > 1 else 0.0)
            if cost < best_cost:
                best, best_cost = tuple(chosen), cost
            return
        for T in cands[a]:
            if math.prod(chosen) * T > 512:
                break  # candidates are sorted
            rec(a + 1, chosen + [T])

    rec(0, [])
    return best


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 4


def _plan(shape, ks, ds, ss, cs, tiles, device, dtype):
    key = (shape, ks, ds, ss, cs, tiles, str(device), dtype)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    m = len(shape)
    axes, masks = [], []
    for n, k, d, s, c, T in zip(shape, ks, ds, ss, cs, tiles):
        ax, mk = _axis_mask(n, k, d, s, c, T, device)
        axes.append(ax)
        masks.append(mk)
    # One mask per tile: (d.., nt[_tile_order].., T.., hk..) -> (R, nt_1, Tq, Hk), R = prod(d) * prod(nt_2..).
    full = None
    order = _tile_order(m)
    for a, mk in enumerate(masks):
        view = [1] * (4 * m)
        for j, size in enumerate(mk.shape):
            view[j * m + (order.index(a) if j == 1 else a)] = size
        part = mk.view(view)
        full = part if full is None else full & part
    tq = math.prod(ax.T for ax in axes)
    hk = math.prod(ax.hk for ax in axes)
    bmask = full.reshape(-1, axes[0].nt, tq, hk)
    # In 1-D with equal dilation groups every group has the same mask: fold the groups into the batch.
    shared = m == 1 and axes[0].n % axes[0].d == 0
    if shared:
        bmask = bmask[:1]
    fmask = torch.zeros(bmask.shape, dtype=dtype, device=device).masked_fill_(~bmask, float("-inf"))
    out = (tuple(axes), shared, bmask, fmask)
    _CACHE[key] = out
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return out


def _pad_axes(x: torch.Tensor, pads) -> torch.Tensor:
    """Pad (or crop, for negative amounts) the spatial axes of `(B, H, *spatial, C)` in one copy;
    pads: `(left, right)` per spatial axis."""
    if all(p == (0, 0) for p in pads):
        return x
    flat = [0, 0]
    for left, right in reversed(pads):
        flat += [left, right]
    return F.pad(x, flat)


def _tile_order(m: int) -> list:
    """Order of the tile axes in the flattened tile index: inner axes first, the first spatial axis last
    (so that the key halos of consecutive first-axis tiles are overlapping views, see `_tile_keys`)."""
    return list(range(1, m)) + [0]


def _tile_queries(x, axes):
    """(B, H, n_1..n_m, C) -> (B*H, R, nt_1, T_1*..*T_m, C); tiles ordered (d.., nt_2.., nt_1)."""
    B, H, C = x.shape[0], x.shape[1], x.shape[-1]
    m = len(axes)
    x = _pad_axes(x, [(0, ax.nt * ax.T * ax.d - ax.n) for ax in axes])
    x = x.reshape(B, H, *[s for ax in axes for s in (ax.nt, ax.T, ax.d)], C)
    perm = [0, 1] + [2 + 3 * a + 2 for a in range(m)] + [2 + 3 * a for a in _tile_order(m)] + \
        [2 + 3 * a + 1 for a in range(m)] + [2 + 3 * m]
    x = x.permute(perm)
    return x.reshape(B * H, -1, axes[0].nt, math.prod(ax.T for ax in axes), C)


def _tile_keys(x, axes):
    """(B, H, n_1..n_m, C) -> halos (B*H, R, nt_1, hk_1*..*hk_m, C), tiles ordered as in `_tile_queries`.

    The inner axes (2..m) are cut into halos with one copy, laid out `(.., nt_2.., L_1, hk_2.., C)`;
    then the halos along the first axis are overlapping windows of that buffer, taken as a view
    (`unfold` with step T_1): in 1-D no copy is made at all."""
    B, H, C = x.shape[0], x.shape[1], x.shape[-1]
    m = len(axes)
    x = _pad_axes(x, [(ax.pl * ax.d, ax.L * ax.d - ax.pl * ax.d - ax.n) for ax in axes])
    x = x.reshape(B, H, *[s for ax in axes for s in (ax.L, ax.d)], C)
    perm = [0, 1] + [2 + 2 * a + 1 for a in range(m)] + [2 + 2 * a for a in range(m)] + [2 + 2 * m]
    x = x.permute(perm)  # (B, H, d.., L.., C)
    for a in range(1, m):
        x = x.unfold(2 + m + a, axes[a].hk, axes[a].T)  # L_a -> nt_a, appends hk_a
    if m == 1:
        x = x.contiguous()  # so that the halos below are a view (no-op for contiguous inputs)
    if m > 1:
        # (B, H, d.., L_1, nt_2.., C, hk_2..) -> (B, H, d.., nt_2.., L_1, hk_2.., C), one copy
        perm = list(range(2 + m)) + [3 + m + a for a in range(m - 1)] + [2 + m] + \
            [3 + 2 * m + a for a in range(m - 1)] + [2 + 2 * m]
        x = x.permute(perm).contiguous()
    lead = 2 + m + (m - 1)  # position of L_1
    P0, L, Q = math.prod(x.shape[:lead]), x.shape[lead], math.prod(x.shape[lead + 1:])
    halos = _Halos.apply(x.reshape(P0, L, Q), axes[0].nt, axes[0].T, axes[0].hk)  # (P0, nt_1, hk_1, Q)
    # (B, H, d.., nt_2..) are the leading dims of a contiguous buffer and (hk_1, hk_2.., C) the trailing
    # ones; only nt_1 strides by T_1 rows into overlapping halos: the reshape below is a view.
    return halos.reshape(B * H, -1, axes[0].nt, math.prod(ax.hk for ax in axes), C)


class _Halos(torch.autograd.Function):
    """Overlapping windows `(P, nt, hk, Q)` (step T along L) of a contiguous `(P, L, Q)` buffer, as a view;
    the backward folds the window gradients back with `ceil(hk / T)` strided adds (each a set of
    non-overlapping windows), cheaper than the generic `unfold` backward."""

    @staticmethod
    def forward(ctx, x, nt: int, T: int, hk: int):
        P, L, Q = x.shape
        ctx.dims = (P, L, Q, nt, T, hk)
        return x.as_strided((P, nt, hk, Q), (L * Q, T * Q, Q, 1), x.storage_offset())

    @staticmethod
    def backward(ctx, g):
        P, L, Q, nt, T, hk = ctx.dims
        dx = g.new_zeros((P, L, Q))
        for j0 in range(0, hk, T):
            w = min(T, hk - j0)
            dx.as_strided((P, nt, w, Q), (L * Q, T * Q, Q, 1), j0 * Q).add_(g[:, :, j0:j0 + w])
        return dx, None, None, None


def _untile(x, B, H, axes):
    """(B*H, R, nt_1, T_1*..*T_m, C) -> (B, H, n_1..n_m, C)."""
    m = len(axes)
    C = x.shape[-1]
    order = _tile_order(m)
    x = x.reshape(B, H, *[ax.d for ax in axes], *[axes[a].nt for a in order], *[ax.T for ax in axes], C)
    perm = [0, 1] + [p for a in range(m) for p in (2 + m + order.index(a), 2 + 2 * m + a, 2 + a)] + [2 + 3 * m]
    x = x.permute(perm).reshape(B, H, *[ax.nt * ax.T * ax.d for ax in axes], C)
    return x[(slice(None), slice(None)) + tuple(slice(0, ax.n) for ax in axes)]


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
    tile: query tile per axis in dilation-group coordinates (default: `default_tiles`); backend: "auto"
    (NATTEN's fused kernels on CUDA when installed, else anyattn's engine through SDPA; see
    `backend_choice`), "natten", "sdpa" (anyattn's engine on torch SDPA) or "blocked" (anyattn's tiled
    engine).

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
        tiles = default_tiles(tuple(spatial), ks, ds, ss)
    else:
        tiles = tuple(tile) if isinstance(tile, (list, tuple)) else (tile,) * m
        if len(tiles) != m or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiles):
            raise ValueError(f"tile must be a positive int or a sequence of {m} positive ints, got {tile!r}")
    dtype = q.dtype
    device = q.device
    cpu_fast = lse_supported(device, dtype)  # a fused kernel with a differentiable LSE (CPU flash, CUDA efficient)
    need_lse = return_lse or n_add > 0
    fused = backend != "blocked" and (cpu_fast or not need_lse)  # SDPA runs it (else: blocked)
    work = dtype if fused else torch.promote_types(dtype, torch.float32)
    axes, shared, bmask, fmask = _plan(spatial, ks, ds, ss, cs, tiles, device, work)
    G = H // H_kv
    kk, vv = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    qt = _tile_queries(q.to(work), axes)
    kt = _tile_keys(kk.to(work), axes)
    vt = _tile_keys(vv.to(work), axes)
    BH, R, nt, tq, hk = kt.shape[0], kt.shape[1], kt.shape[2], qt.shape[3], kt.shape[3]

    def run(qi, ki, vi):
        tshape = Shape(qi.shape[0], nt, nt, tq, hk, D, D_v)
        if backend == "blocked" or (need_lse and not cpu_fast):
            return blocked_attention(qi, ki, vi, Dense(bmask), None, scale, tshape, block_q=tq, block_k=hk)
        if need_lse:  # CPU flash kernel with a differentiable LSE
            return sdpa_attention(qi, ki, vi, fmask, False, scale, tshape, True)
        if D != D_v:
            return sdpa_attention(qi, ki, vi, fmask, False, scale, tshape, False)
        # No row is empty (every query sees itself), so the plain SDPA call needs no fix-up.
        return F.scaled_dot_product_attention(qi, ki, vi, attn_mask=fmask, scale=scale), None

    if shared or R == 1:
        # One call for all heads: the (R, nt_1, Tq, Hk) mask broadcasts over the batch.
        out_t, lse_t = run(qt.reshape(BH * R, nt, tq, D), kt.reshape(BH * R, nt, hk, D), vt.reshape(BH * R, nt, hk, D_v))
    else:
        # 2-D/3-D: the halos are strided views per (batch, head); the mask (R, nt_1, Tq, Hk) covers one.
        res = [run(qi, ki, vi) for qi, ki, vi in zip(qt.unbind(0), kt.unbind(0), vt.unbind(0))]
        out_t = torch.stack([r[0] for r in res])
        lse_t = torch.stack([r[1] for r in res]) if res[0][1] is not None else None
    out = _untile(out_t, B, H, axes)
    lse = _untile(lse_t.unsqueeze(-1), B, H, axes).squeeze(-1) if lse_t is not None else None
    if n_add:
        N = math.prod(spatial)
        qf = q.reshape(B, H, N, D)
        ashape = Shape(B, H, H_kv, N, n_add, D, D_v)
        if lse_supported(device, dtype) and backend != "blocked":
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
    fused = lse_supported(q.device, q.dtype) or not return_lse
    engine = "query tiles x key halos in one fused SDPA call" if fused else "query tiles x key halos on the " \
                                                                           "blocked engine (LSE)"
    return Choice("anyattn", f"anyattn's engine: {engine} (NATTEN not used: {why})")


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
                     "backend": "'auto', 'sdpa' or 'blocked'"}))


_register()
