"""`cross_scan_2d` / `cross_merge_2d` against explicit index maps (and adjointness), and `frequency_filter`
against the dense circular convolution (float64, outputs and gradients of x and the filter)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.ssm import cross_merge_2d, cross_scan_2d, frequency_filter


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 5), W=st.integers(1, 5))
def test_cross_scan_index_maps_and_adjoint(B, C, H, W):
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    s = cross_scan_2d(x)
    L = H * W
    i = list(range(L))
    rev = [L - 1 - j for j in i]
    assert torch.equal(s[:, 0], x[:, :, [j // W for j in i], [j % W for j in i]])          # row-major
    assert torch.equal(s[:, 1], x[:, :, [j % H for j in i], [j // H for j in i]])          # column-major
    assert torch.equal(s[:, 2], s[:, 0, :, rev]) and torch.equal(s[:, 3], s[:, 1, :, rev])
    y = torch.randn(B, 4, C, L, dtype=torch.float64)
    torch.testing.assert_close((s * y).sum(), (x * cross_merge_2d(y, H, W)).sum())          # merge = scan^T
    torch.testing.assert_close(cross_merge_2d(s, H, W), 4 * x)


def _circular(x, kernel):
    """y[..., i, j] = sum_{a, b} kernel[..., a, b] x[..., i - a, j - b] (indices mod H, W)."""
    H, W = x.shape[-2:]
    y = torch.zeros(torch.broadcast_shapes(x.shape, kernel.shape), dtype=x.dtype)
    for a in range(H):
        for b in range(W):
            y = y + kernel[..., a:a + 1, b:b + 1] * torch.roll(x, (a, b), (-2, -1))
    return y


@pytest.mark.parametrize("H,W", [(4, 5), (3, 3), (6, 4), (1, 7)])
def test_real_kernel_is_a_circular_convolution_with_gradients(H, W):
    g = torch.Generator().manual_seed(H * W)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    kernel = torch.randn(3, H, W, generator=g, dtype=torch.float64, requires_grad=True)
    y = frequency_filter(x, torch.fft.rfft2(kernel))
    ref = _circular(x, kernel)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((y * w).sum(), (x, kernel)), torch.autograd.grad((ref * w).sum(), (x, kernel))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(H=st.integers(1, 5), W=st.integers(1, 6), per_sample=st.booleans())
def test_any_complex_filter_is_the_circulant_of_its_inverse_transform(H, W, per_sample):
    g = torch.Generator().manual_seed(H * 7 + W)
    x = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
    filt = torch.randn((2 if per_sample else 1), 3, H, W // 2 + 1, generator=g, dtype=torch.complex128)
    filt = filt.requires_grad_()
    y = frequency_filter(x, filt)
    ref = _circular(x, torch.fft.irfft2(filt, s=(H, W)))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((y * w).sum(), filt)[0],
                               torch.autograd.grad((ref * w).sum(), filt)[0], rtol=1e-10, atol=1e-10)


def test_float32_spectrum_argument_and_validation():
    x = torch.randn(2, 3, 4, 6)
    filt = torch.randn(3, 4, 4, dtype=torch.complex64)
    y = frequency_filter(x, filt)
    assert y.dtype == torch.float32
    torch.testing.assert_close(frequency_filter(x, filt, spectrum=torch.fft.rfft2(x, norm="ortho")), y)
    torch.testing.assert_close(y.double(), _circular(x.double(), torch.fft.irfft2(filt.to(torch.complex128), s=(4, 6))),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="half-spectrum"):
        frequency_filter(x, torch.randn(3, 4, 6, dtype=torch.complex64))
    with pytest.raises(ValueError, match="broadcast"):
        frequency_filter(x, torch.randn(5, 4, 4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="real floating"):
        frequency_filter(x.long(), filt)
    with pytest.raises(ValueError, match="spectrum"):
        frequency_filter(x, filt, spectrum=torch.fft.rfft2(x)[..., :2])
    with pytest.raises(ValueError, match="H \\* W"):
        cross_merge_2d(torch.randn(1, 4, 2, 5), 2, 3)
