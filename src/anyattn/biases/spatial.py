"""Squared-distance bias for point clouds, meshes and grids."""
from __future__ import annotations

import torch

from ..validate import check_tensor
from .base import Bias, _check_param, _work, pick

class SpatialDistance(Bias):
    """Squared-distance bias for point clouds, meshes and PDE grids: `bias[b, h, i, j] =
    -weight[h] * |x_i - y_j|^2`.

    coords: `(N, d)` or `(B, N, d)` positions; key_coords: the keys' positions (same forms), default
    `coords`. With `key_coords=None`, coords has N_k rows and query i uses row `i + N_k - N_q`; else
    coords has N_q rows. weight: `(H,)` or `(1,)`. Gradients flow to coords, key_coords and weight.
    Exact rank d + 2 (FlashBias): `-w|x - y|^2 = [2 w x, -w |x|^2, -w] . [y, 1, |y|^2]`, with both
    point sets shifted by the keys' mean to limit cancellation."""

    def __init__(self, coords: torch.Tensor, weight: torch.Tensor, key_coords: torch.Tensor | None = None):
        for name, t in (("coords", coords), ("key_coords", key_coords)):
            if t is None:
                continue
            check_tensor(f"SpatialDistance {name}", t)
            if t.dim() not in (2, 3):
                raise ValueError(f"SpatialDistance {name} must have shape (N, d) or (B, N, d), got {tuple(t.shape)}")
            if not t.dtype.is_floating_point:
                raise TypeError(f"SpatialDistance {name} must be a floating tensor, got {t.dtype}")
        check_tensor("SpatialDistance weight", weight, 1)
        if key_coords is not None and key_coords.shape[-1] != coords.shape[-1]:
            raise ValueError(f"SpatialDistance key_coords must have coords' dimension d = {coords.shape[-1]}, "
                             f"got {key_coords.shape[-1]}")
        self.coords, self.weight, self.key_coords = coords, weight, key_coords

    def tensors(self):
        ts = (self.coords, self.weight)
        return ts if self.key_coords is None else ts + (self.key_coords,)

    def validate(self, B, H, n_q, n_k, device, dtype):
        if self.weight.shape[0] not in (1, H):
            raise ValueError(f"SpatialDistance weight must have shape (H,) = ({H},), got {tuple(self.weight.shape)}")
        _check_param("SpatialDistance", "weight", self.weight, device)
        if self.key_coords is None and n_q > n_k:
            raise ValueError(f"SpatialDistance without key_coords needs N_q <= N_k (query i uses coords row "
                             f"i + N_k - N_q), got N_q = {n_q}, N_k = {n_k}; pass key_coords")
        pairs = [("coords", self.coords, n_k if self.key_coords is None else n_q)]
        if self.key_coords is not None:
            pairs.append(("key_coords", self.key_coords, n_k))
        for name, t, n in pairs:
            _check_param("SpatialDistance", name, t, device)
            if t.shape[-2] != n or (t.dim() == 3 and t.shape[0] not in (1, B)):
                want = f"(N, d) or (B, N, d) with N = {n}, B = {B}"
                raise ValueError(f"SpatialDistance {name} must have shape {want}, got {tuple(t.shape)}")

    def _split(self, tensors, n_q, n_k):
        x = tensors[0]
        y = tensors[2] if self.key_coords is not None else x
        x = x if x.dim() == 3 else x.unsqueeze(0)
        y = y if y.dim() == 3 else y.unsqueeze(0)
        if self.key_coords is None:
            x = x[:, n_k - n_q:]
        return x, y, tensors[1]

    def tile(self, tensors, q0, q1, k0, k1, n_q, n_k):
        x, y, w = self._split(tensors, n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        xt, yt = x[:, q0:q1].to(wd), y[:, k0:k1].to(wd)
        d2 = (xt.unsqueeze(2) - yt.unsqueeze(1)).square().sum(-1)  # (B|1, Tq, Tk)
        return -(w.to(wd).view(1, -1, 1, 1) * d2.unsqueeze(1))

    def at(self, tensors, b, h, q_idx, kv_idx, n_q, n_k):
        x, y, w = self._split(tensors, n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        x = x[b.reshape(-1)] if x.shape[0] > 1 else x
        y = y[b.reshape(-1)] if y.shape[0] > 1 else y
        xt, yt = x[:, q_idx.reshape(-1)].to(wd), y[:, kv_idx.reshape(-1)].to(wd)
        d2 = (xt.unsqueeze(2) - yt.unsqueeze(1)).square().sum(-1).unsqueeze(1)  # (B'|1, 1, Tq, Tk)
        return -(w.to(wd)[h if w.shape[0] > 1 else torch.zeros_like(h)] * d2)

    def bias_mod(self, n_q, n_k):
        x, w = self.coords, self.weight
        y = self.key_coords if self.key_coords is not None else x
        off = n_k - n_q if self.key_coords is None else 0  # query i uses coords row i + N_k - N_q
        x3, y3 = (x if x.dim() == 3 else x.unsqueeze(0)), (y if y.dim() == 3 else y.unsqueeze(0))
        wd = _work(torch.promote_types(x.dtype, w.dtype))

        def mod(b, h, q_idx, kv_idx):
            bx, by = pick(b, x3.shape[0]), pick(b, y3.shape[0])
            d2 = sum((x3[bx, q_idx + off, c].to(wd) - y3[by, kv_idx, c].to(wd)).square() for c in range(x3.shape[-1]))
            return -(w[pick(h, w.shape[0])].to(wd) * d2)
        return mod

    def exact_rank(self, mask, n_q, n_k):
        return self.coords.shape[-1] + 2

    def exact_factors(self, mask, n_q, n_k):
        x, y, w = self._split(self.tensors(), n_q, n_k)
        wd = _work(torch.promote_types(x.dtype, w.dtype))
        x, y, w = x.to(wd), y.to(wd), w.to(wd)
        c = y.detach().mean(dim=1, keepdim=True)  # distances are shift invariant
        x, y = x - c, y - c
        H = w.shape[0]
        wv = w.view(1, H, 1, 1)
        xs = x.unsqueeze(1)  # (B|1, 1, n_q, d)
        x2 = xs.square().sum(-1, keepdim=True)
        lead = (xs.shape[0], H, xs.shape[2])
        U = torch.cat([(2 * wv * xs).expand(*lead, xs.shape[-1]), (-wv * x2).expand(*lead, 1),
                       (-wv).expand(*lead, 1)], -1)
        ys = y.unsqueeze(1)
        V = torch.cat([ys, torch.ones_like(ys[..., :1]), ys.square().sum(-1, keepdim=True)], -1)
        return U, V

    def __repr__(self):
        return f"SpatialDistance(d={self.coords.shape[-1]}, H={self.weight.shape[0]})"
