"""Layers for 2-D (and N-D) grids, channels-last `x (B, *spatial, dim)`:

- `DiNATLayer` + `dinat_dilations`: the Dilated Neighborhood Attention Transformer block (Hassani and Shi,
  "Dilated Neighborhood Attention Transformer", 2022): pre-norm neighborhood attention (dilation 1 or
  `floor(n / k)`, alternating across layers) and MLP, on `anyattn.neighborhood`.
- `AFFLayer`: the Adaptive Frequency Filter token mixer (Huang et al., ICCV 2023): an instance-adaptive
  mask computed from the 2-D spectrum, applied by `anyattn.ssm.frequency_filter`.
- `SS2D` and `SerpentBlock`: VMamba's 2-D selective scan (cross-scan in four directions around
  `anyattn.ssm.selective_scan`, cross-merge) and Serpent's multi-scale U-Net of such blocks (Sepehri et al.,
  "Serpent: Scalable and Efficient Image Restoration via Multi-scale Structured State Space Models", 2024).

These mix a whole grid at once (no causal order), so they are not sequence mixers of `MIXERS`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ssm.cross_scan import cross_merge_2d, cross_scan_2d
from ..ssm.frequency_filter import frequency_filter
from ..ssm.selective_scan import selective_scan
from ..validate import check_positive_int, check_tensor
from .neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

__all__ = ["DiNATLayer", "dinat_dilations", "AFFLayer", "SS2D", "SerpentBlock"]


def _check_grid_x(x, dim, m, what="x"):
    check_tensor(what, x)
    if x.dim() != m + 2 or x.shape[-1] != dim or 0 in x.shape:
        raise ValueError(f"{what} must have shape (B, {', '.join(f'n{i + 1}' for i in range(m))}, dim={dim}), "
                         f"got {tuple(x.shape)}")


class _MLP(nn.Module):
    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = max(1, int(dim * ratio))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


# ------------------------------------------------------------------------------------------- DiNAT
def dinat_dilations(size, kernel_size, depth: int) -> list:
    """DiNAT's dilation schedule for `depth` layers at resolution `size` (int or per-axis tuple): layers
    alternate neighborhood attention (dilation 1) and dilated neighborhood attention with the largest
    dilation the resolution allows, `floor(n / k)` per axis (at least 1). Returns one int or tuple per layer."""
    check_positive_int("depth", depth)
    sizes = tuple(size) if isinstance(size, (tuple, list)) else (size,)
    ks = tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else (kernel_size,) * len(sizes)
    if len(ks) != len(sizes):
        raise ValueError(f"kernel_size must be an int or have one entry per axis of size {sizes}, got {kernel_size!r}")
    for n, k in zip(sizes, ks):
        check_positive_int("size", n)
        check_positive_int("kernel_size", k)
        if k > n:
            raise ValueError(f"kernel_size {k} is larger than the axis size {n}")
    sparse = tuple(max(1, n // k) for n, k in zip(sizes, ks))
    dense = (1,) * len(sizes)
    one = not isinstance(size, (tuple, list))
    return [(dense if i % 2 == 0 else sparse)[0] if one else (dense if i % 2 == 0 else sparse) for i in range(depth)]


class DiNATLayer(nn.Module):
    """One DiNAT block on `(B, *spatial, dim)`: `x + NA(LN(x))`, then `x + MLP(LN(x))`, with NA the
    (dilated) neighborhood attention of `anyattn.nn.NeighborhoodAttention{1,2,3}d` (NATTEN semantics).
    spatial_dims 1, 2 or 3; kernel_size, dilation: int or per-axis; build a stack with `dinat_dilations`."""

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, *, spatial_dims: int = 2,
                 mlp_ratio: float = 4.0, is_causal=False, rotary: bool = False):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        cls = {1: NeighborhoodAttention1d, 2: NeighborhoodAttention2d, 3: NeighborhoodAttention3d}[spatial_dims]
        self.spatial_dims = spatial_dims
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = cls(dim, num_heads, kernel_size, dilation, is_causal=is_causal, rotary=rotary)
        self.mlp = _MLP(dim, mlp_ratio)

    def forward(self, x):
        _check_grid_x(x, self.attn.dim, self.spatial_dims)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------------------------- AFF
class AFFLayer(nn.Module):
    """Adaptive Frequency Filter token mixer on `(B, H, W, dim)`:

        X = rfft2(x) (orthonormal);  M = softshrink(W2 ReLU(W1 X + b1) + b2);  y = irfft2(M * X) + x

    W1, W2 complex and block-diagonal over channels (num_blocks blocks), shared by all frequencies; ReLU and
    softshrink act on real and imaginary parts. The product with M is a global depthwise circular
    convolution (`anyattn.ssm.frequency_filter`) whose kernel adapts to each input."""

    def __init__(self, dim: int, num_blocks: int = 8, *, sparsity_threshold: float = 0.01, hidden_factor: int = 1,
                 init_scale: float = 0.02):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_blocks = check_positive_int("num_blocks", num_blocks)
        if dim % num_blocks:
            raise ValueError(f"dim ({dim}) must be divisible by num_blocks ({num_blocks})")
        hidden_factor = check_positive_int("hidden_factor", hidden_factor)
        bs = dim // num_blocks
        self.sparsity_threshold = float(sparsity_threshold)
        # (real, imag) pairs, as complex weights: w1 (nb, bs, bs*hf), w2 (nb, bs*hf, bs)
        self.w1 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs, bs * hidden_factor))
        self.b1 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs * hidden_factor))
        self.w2 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs * hidden_factor, bs))
        self.b2 = nn.Parameter(init_scale * torch.randn(2, num_blocks, bs))

    @staticmethod
    def _c(p):
        return torch.complex(p[0], p[1])

    def mask(self, spectrum: torch.Tensor) -> torch.Tensor:
        """The instance-adaptive mask M for a spectrum `(B, dim, H, W // 2 + 1)` (complex)."""
        B, C, H, Wf = spectrum.shape
        nb = self.num_blocks
        s = spectrum.reshape(B, nb, C // nb, H, Wf)
        dt = s.real.dtype
        o = torch.einsum("bkihw,kio->bkohw", s, self._c(self.w1.to(dt))) + self._c(self.b1.to(dt))[..., None, None]
        o = torch.complex(F.relu(o.real), F.relu(o.imag))
        o = torch.einsum("bkihw,kio->bkohw", o, self._c(self.w2.to(dt))) + self._c(self.b2.to(dt))[..., None, None]
        o = torch.complex(F.softshrink(o.real, self.sparsity_threshold), F.softshrink(o.imag, self.sparsity_threshold))
        return o.reshape(B, C, H, Wf)

    def forward(self, x):
        _check_grid_x(x, self.dim, 2)
        xc = x.permute(0, 3, 1, 2)
        spectrum = torch.fft.rfft2(xc.to(torch.promote_types(x.dtype, torch.float32)), norm="ortho")
        y = frequency_filter(xc, self.mask(spectrum), spectrum=spectrum)
        return (y + xc).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------- SS2D, Serpent
class SS2D(nn.Module):
    """VMamba's 2-D selective scan on `(B, H, W, dim)`: in_proj -> (x, z); x -> depthwise 3x3 conv -> SiLU ->
    `cross_scan_2d` (4 directions); per direction x_proj -> (dt, B, C) and dt_proj; one `selective_scan`
    call over the 4 directions (directions = channel groups of B and C; delta softplus + bias; D skip);
    `cross_merge_2d`; LayerNorm; `* SiLU(z)`; out_proj. scan_mode: `selective_scan`'s mode."""

    def __init__(self, dim: int, d_state: int = 16, expand: int = 1, d_conv: int = 3, dt_rank="auto",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, scan_mode: str = "chunk"):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_inner = di = check_positive_int("expand", expand) * dim
        self.dt_rank = math.ceil(dim / 16) if dt_rank == "auto" else check_positive_int("dt_rank", dt_rank)
        self.scan_mode = scan_mode
        self.in_proj = nn.Linear(dim, 2 * di, bias=False)
        self.conv = nn.Conv2d(di, di, d_conv, padding=d_conv // 2, groups=di)
        self.x_proj = nn.Parameter(torch.randn(4, self.dt_rank + 2 * d_state, di) * di ** -0.5)
        self.dt_proj = nn.Parameter(torch.randn(4, di, self.dt_rank) * self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand(4 * di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(4 * di, 1))
        self.D = nn.Parameter(torch.ones(4 * di))
        self.norm = nn.LayerNorm(di)
        self.out_proj = nn.Linear(di, dim, bias=False)

    def forward(self, x):
        _check_grid_x(x, self.dim, 2)
        Bsz, H, W, _ = x.shape
        L, di, N, R = H * W, self.d_inner, self.d_state, self.dt_rank
        xs, z = self.in_proj(x).chunk(2, -1)
        xs = F.silu(self.conv(xs.permute(0, 3, 1, 2)))                      # (B, di, H, W)
        xk = cross_scan_2d(xs)                                             # (B, 4, di, L)
        dbc = torch.einsum("bkdl,kcd->bkcl", xk, self.x_proj.to(xk.dtype))
        dts, Bs, Cs = dbc.split([R, N, N], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_proj.to(xk.dtype))
        y = selective_scan(xk.reshape(Bsz, 4 * di, L), dts.reshape(Bsz, 4 * di, L), -torch.exp(self.A_log.to(xk.dtype)),
                           Bs, Cs, self.D.to(xk.dtype), None, self.dt_bias.to(xk.dtype), True, mode=self.scan_mode)
        y = cross_merge_2d(y.view(Bsz, 4, di, L), H, W).permute(0, 2, 3, 1)  # (B, H, W, di)
        return self.out_proj(self.norm(y) * F.silu(z))


class _VSSBlock(nn.Module):
    """`x + SS2D(LN(x))`, then `x + MLP(LN(x))`."""

    def __init__(self, dim, d_state, mlp_ratio, scan_mode):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mixer = SS2D(dim, d_state, scan_mode=scan_mode)
        self.mlp = _MLP(dim, mlp_ratio)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SerpentBlock(nn.Module):
    """Serpent's multi-scale unit on `(B, H, W, dim)`: a U-Net of VSS blocks (`SS2D` + MLP). Encoder: at each
    of `levels` scales a VSS block, then 2x2 patch merging (width doubles, resolution halves); a bottleneck
    VSS block; decoder: 2x pixel-shuffle upsampling (width halves), skip connection added, a VSS block.
    Output shape = input shape; H and W must be divisible by `2 ** levels`."""

    def __init__(self, dim: int, levels: int = 2, *, d_state: int = 16, mlp_ratio: float = 2.0,
                 scan_mode: str = "chunk"):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.levels = check_positive_int("levels", levels)
        dims = [dim * 2 ** l for l in range(levels + 1)]
        self.enc = nn.ModuleList(_VSSBlock(dims[l], d_state, mlp_ratio, scan_mode) for l in range(levels))
        self.down = nn.ModuleList(nn.Linear(4 * dims[l], dims[l + 1]) for l in range(levels))
        self.mid = _VSSBlock(dims[levels], d_state, mlp_ratio, scan_mode)
        self.up = nn.ModuleList(nn.Linear(dims[l + 1], 4 * dims[l]) for l in range(levels))
        self.dec = nn.ModuleList(_VSSBlock(dims[l], d_state, mlp_ratio, scan_mode) for l in range(levels))

    def forward(self, x):
        _check_grid_x(x, self.dim, 2)
        B, H, W, _ = x.shape
        f = 2 ** self.levels
        if H % f or W % f:
            raise ValueError(f"H and W must be divisible by 2 ** levels = {f}, got {H} x {W}")
        skips = []
        for block, down in zip(self.enc, self.down):
            x = block(x)
            skips.append(x)
            b, h, w, c = x.shape                                            # 2x2 patch merging
            x = down(x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c))
        x = self.mid(x)
        for l in reversed(range(self.levels)):
            b, h, w, _ = x.shape                                            # 2x pixel shuffle
            c = self.up[l].out_features // 4
            x = self.up[l](x).view(b, h, w, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)
            x = self.dec[l](x + skips[l])
        return x
