"""Global depthwise circular convolution by a filter given in the 2-D Fourier domain: the token mixer of
Adaptive Frequency Filters (Huang et al., "Adaptive Frequency Filters As Efficient Global Token Mixers",
ICCV 2023) and of GFNet / AFNO-style layers.

    frequency_filter(x, filt) = irfft2(filt * rfft2(x))          over the last two (spatial) dims

The product in the frequency domain is a circular convolution in space with kernel `irfft2(filt)`, per
channel: O(H W log(H W)) instead of O((H W)^2). An instance-adaptive filter (one per sample, as in AFF)
is just a filter with a batch dimension.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor

__all__ = ["frequency_filter"]


def frequency_filter(x: torch.Tensor, filt: torch.Tensor, *, spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """Circular convolution of x with the kernel whose half spectrum is `filt`.

    x `(..., H, W)` real; filt complex, broadcastable to `(..., H, W // 2 + 1)` (the `rfft2` half spectrum;
    a real filt is taken as a zero-phase filter). spectrum: `torch.fft.rfft2(x, norm="ortho")` when the
    caller already has it (AFF computes its mask from it). Returns `(..., H, W)` in x's dtype; gradients
    flow to x and filt.
    """
    check_tensor("x", x)
    check_tensor("filt", filt)
    if x.dim() < 2 or x.is_complex() or not x.dtype.is_floating_point:
        raise TypeError(f"x must be a real floating tensor (..., H, W), got {x.dtype} of shape {tuple(x.shape)}")
    H, W = x.shape[-2:]
    if filt.dim() < 2 or tuple(filt.shape[-2:]) != (H, W // 2 + 1):
        raise ValueError(f"filt must have the half-spectrum shape (..., H, W // 2 + 1) = (..., {H}, {W // 2 + 1}), "
                         f"got {tuple(filt.shape)}")
    try:
        torch.broadcast_shapes(filt.shape[:-2], x.shape[:-2])
    except RuntimeError:
        raise ValueError(f"filt's leading dims {tuple(filt.shape[:-2])} do not broadcast to x's "
                         f"{tuple(x.shape[:-2])}") from None
    if filt.device != x.device:
        raise ValueError(f"filt must be on x's device {x.device}, got {filt.device}")
    work = torch.promote_types(x.dtype, torch.float32)
    if spectrum is None:
        spectrum = torch.fft.rfft2(x.to(work), norm="ortho")
    elif tuple(spectrum.shape) != tuple(x.shape[:-1]) + (W // 2 + 1,):
        raise ValueError(f"spectrum must be rfft2(x) of shape {tuple(x.shape[:-1]) + (W // 2 + 1,)}, "
                         f"got {tuple(spectrum.shape)}")
    y = torch.fft.irfft2(spectrum * filt.to(spectrum.dtype if filt.is_complex() else spectrum.real.dtype),
                         s=(H, W), norm="ortho")
    return y.to(x.dtype)
