"""Local + global attention on a 2-D grid (Scale-DiT style; METHODS.md "Structured, hierarchical and
2-D mixers"): high-resolution tokens attend to the tokens of their own aligned `window x window` block
plus every global (low-resolution) token; global tokens attend to the global tokens.

Exact, as two attentions merged by log-sum-exp (`anyattn.lse.merge`): the block part is one batched call
with the blocks as batch (keys of padded partial blocks masked), the global part one call of all N tokens
over the M global tokens; both through `anyattn.softmax.lse_attention.attention_lse` (SDPA's CPU flash
kernel with a differentiable LSE; the blocked engine where SDPA has no LSE). Cost O(N (w^2 + M) D);
nothing N x N is formed.

Token order: "row_major" (default) gathers the blocks with one copy; with tokens kept in a
space-filling-curve order ("morton" / "hilbert", see `anyattn.grid_order`) every aligned block is a run
of `w^2` consecutive tokens and no gather is needed (window a power of two dividing both grid sides).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grid_order import ORDERS
from ..lse import merge
from ..masks import Dense
from ..validate import Shape, check_qkv, check_scale
from .lse_attention import attention_lse
from .sdpa import sdpa_attention

__all__ = ["local_global_attention", "local_global_mask"]


def _window(window) -> tuple[int, int]:
    w = tuple(window) if isinstance(window, (tuple, list)) else (window, window)
    if len(w) != 2 or any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in w):
        raise ValueError(f"window must be a positive int or a pair of positive ints, got {window!r}")
    return w


def _grid(grid, N=None) -> tuple[int, int]:
    if not isinstance(grid, (tuple, list)) or len(grid) != 2 or \
            any(isinstance(a, bool) or not isinstance(a, int) or a < 1 for a in grid):
        raise ValueError(f"grid must be a pair of positive ints (H, W), got {grid!r}")
    if N is not None and grid[0] * grid[1] != N:
        raise ValueError(f"grid {tuple(grid)} holds {grid[0] * grid[1]} tokens, but q holds N = {N}")
    return tuple(grid)


def _check_order(order, grid, win):
    if order == "row_major":
        return
    if order not in ORDERS:
        raise ValueError(f"order must be 'row_major' or one of {ORDERS}, got {order!r}")
    w = win[0]
    if win[0] != win[1] or w & (w - 1) or grid[0] % w or grid[1] % w:
        raise ValueError(f"order={order!r} needs a square power-of-two window dividing both grid sides, got "
                         f"window {win} on grid {grid}")


def local_global_mask(grid, window, n_global: int, device=None) -> torch.Tensor:
    """The equivalent dense bool mask `(N + M, N + M)` over `[grid tokens (row-major); global tokens]`
    (True = attend), for SDPA with a dense mask and for tests."""
    Hg, Wg = _grid(grid)
    wh, ww = _window(window)
    N, M = Hg * Wg, n_global
    r = torch.arange(Hg, device=device).view(Hg, 1).expand(Hg, Wg).reshape(-1) // wh
    c = torch.arange(Wg, device=device).view(1, Wg).expand(Hg, Wg).reshape(-1) // ww
    blk = r * (-(-Wg // ww)) + c
    m = torch.zeros(N + M, N + M, dtype=torch.bool, device=device)
    m[:N, :N] = blk[:, None] == blk[None, :]
    m[:, N:] = True
    return m


def _to_blocks(x, grid, win, order):
    """(B, H, N, C) -> (B*H, nb, wh*ww, C) blocks (padded with zeros at partial blocks, row-major order)."""
    B, H, N, C = x.shape
    wh, ww = win
    if order != "row_major":
        return x.reshape(B * H, N // (wh * ww), wh * ww, C)
    Hg, Wg = grid
    nh, nw = -(-Hg // wh), -(-Wg // ww)
    x = x.reshape(B, H, Hg, Wg, C)
    if nh * wh != Hg or nw * ww != Wg:
        x = F.pad(x, (0, 0, 0, nw * ww - Wg, 0, nh * wh - Hg))
    x = x.reshape(B, H, nh, wh, nw, ww, C).permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B * H, nh * nw, wh * ww, C)


def _from_blocks(x, B, H, grid, win, order):
    """Inverse of `_to_blocks` for `(B*H, nb, wh*ww, C)` -> `(B, H, N, C)`."""
    C = x.shape[-1]
    wh, ww = win
    Hg, Wg = grid
    if order != "row_major":
        return x.reshape(B, H, Hg * Wg, C)
    nh, nw = -(-Hg // wh), -(-Wg // ww)
    x = x.reshape(B, H, nh, nw, wh, ww, C).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, H, nh * wh, nw * ww, C)
    return x[:, :, :Hg, :Wg].reshape(B, H, Hg * Wg, C)


def _pad_mask(grid, win, device):
    """Bool `(nb, w^2, w^2)` masking the padded keys of partial blocks (None when the grid tiles exactly)."""
    Hg, Wg = grid
    wh, ww = win
    nh, nw = -(-Hg // wh), -(-Wg // ww)
    if nh * wh == Hg and nw * ww == Wg:
        return None
    r = torch.arange(nh * wh, device=device).view(nh, wh, 1, 1) < Hg
    c = torch.arange(nw * ww, device=device).view(1, 1, nw, ww) < Wg
    real = (r & c).permute(0, 2, 1, 3).reshape(nh * nw, 1, wh * ww)
    return real.expand(nh * nw, wh * ww, wh * ww)


def local_global_attention(q, k, v, q_g, k_g, v_g, *, grid, window, order: str = "row_major", scale=None):
    """Windowed attention on a 2-D grid plus global tokens.

    q `(B, H, N, D)`, k `(B, H_kv, N, D)`, v `(B, H_kv, N, D_v)`: the N = gH * gW tokens of `grid = (gH, gW)`
    in `order` ("row_major", or "morton" / "hilbert" as produced by `anyattn.grid_order`);
    q_g `(B, H, M, D)`, k_g `(B, H_kv, M, D)`, v_g `(B, H_kv, M, D_v)`: M >= 1 global tokens.
    window: int or `(wh, ww)`; blocks are aligned at multiples of the window (partial blocks at the far
    edges). Each grid token attends to its block plus every global token (one joint softmax); each global
    token attends to the global tokens. scale defaults to `D ** -0.5`.
    Returns `(out (B, H, N, D_v), out_global (B, H, M, D_v))`, out in q's order.
    """
    shape = check_qkv(q, k, v)
    gshape = check_qkv(q_g, k_g, v_g)
    for name, a, b in (("q_g", q_g, q), ("k_g", k_g, k), ("v_g", v_g, v)):
        if a.dtype != b.dtype or a.device != b.device:
            raise ValueError(f"{name} must have the grid tokens' dtype and device ({b.dtype}, {b.device}), "
                             f"got ({a.dtype}, {a.device})")
    if shape.N_q != shape.N_k:
        raise ValueError(f"q and k must hold the same grid tokens, got N_q = {shape.N_q}, N_k = {shape.N_k}")
    if (gshape.B, gshape.H, gshape.H_kv, gshape.D, gshape.D_v) != (shape.B, shape.H, shape.H_kv, shape.D, shape.D_v):
        raise ValueError(f"global tokens must match the grid tokens' (B, H, H_kv, D, D_v) = "
                         f"{(shape.B, shape.H, shape.H_kv, shape.D, shape.D_v)}, got "
                         f"{(gshape.B, gshape.H, gshape.H_kv, gshape.D, gshape.D_v)}")
    if gshape.N_q != gshape.N_k:
        raise ValueError(f"q_g and k_g must hold the same global tokens, got {gshape.N_q} and {gshape.N_k}")
    grid = _grid(grid, shape.N_q)
    win = _window(window)
    _check_order(order, grid, win)
    scale = check_scale(scale, shape.D)
    B, H, N, D = q.shape
    Dv, M, G = shape.D_v, gshape.N_q, shape.groups
    kk, vv = (k, v) if G == 1 else (k.repeat_interleave(G, 1), v.repeat_interleave(G, 1))
    qb, kb, vb = (_to_blocks(x, grid, win, order) for x in (q, kk, vv))
    nb, T = qb.shape[1], qb.shape[2]
    pm = _pad_mask(grid, win, q.device)
    o1, l1 = attention_lse(qb, kb, vb, None if pm is None else Dense(pm.unsqueeze(0)), scale,
                            Shape(B * H, nb, nb, T, T, D, Dv))
    o1 = _from_blocks(o1, B, H, grid, win, order)
    l1 = _from_blocks(l1.unsqueeze(-1), B, H, grid, win, order).squeeze(-1)
    o2, l2 = attention_lse(q, k_g, v_g, None, scale, Shape(B, H, shape.H_kv, N, M, D, Dv))
    out, _ = merge([o1, o2.to(o1.dtype)], [l1, l2.to(l1.dtype)])
    out_g, _ = sdpa_attention(q_g, k_g, v_g, None, False, scale, gshape, False)
    return out.to(q.dtype), out_g

