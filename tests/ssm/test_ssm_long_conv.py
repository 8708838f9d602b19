import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn.ssm import LongConvState, long_conv, long_conv_step, smooth_kernel, squash_kernel

from _ssm_helpers import assert_close, grads


def direct(u, k, D=None):
    """Causal depthwise convolution by conv1d."""
    Dm, Lk = k.shape
    y = F.conv1d(F.pad(u, (Lk - 1, 0)), k.flip(-1).unsqueeze(1), groups=Dm)
    return y if D is None else y + D[:, None] * u


@pytest.mark.parametrize("L,Lk", [(1, 1), (17, 17), (50, 9), (64, 64), (100, 37)])
def test_fft_matches_conv1d_with_grads(L, Lk):
    u = torch.randn(2, 3, L, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, Lk, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y, g = grads(lambda: long_conv(u, k, D), [u, k, D])
    yr, gr = grads(lambda: direct(u, k, D), [u, k, D])
    assert_close(y[0], yr[0], 1e-12)
    for a, b in zip(g, gr):
        assert_close(a, b, 1e-11)


def test_bidirectional_matches_direct():
    L, Lk = 30, 12
    u = torch.randn(2, 3, L, dtype=torch.float64)
    k = torch.randn(2, 3, Lk, dtype=torch.float64)
    y = long_conv(u, k, bidirectional=True)
    # anti-causal part: y_t += sum_i k1[i] u[t+1+i]  ==  conv1d with the taps reversed in time
    back = F.conv1d(F.pad(u, (0, Lk)), k[1].unsqueeze(1), groups=3)[..., 1:L + 1]
    assert_close(y, direct(u, k[0]) + back, 1e-12)


def test_float32_against_float64():
    u = torch.randn(1, 4, 300, dtype=torch.float64)
    k = torch.randn(4, 300, dtype=torch.float64) / 30
    y = long_conv(u.float(), k.float())
    assert y.dtype == torch.float32
    assert_close(y.double(), direct(u, k), 1e-5)


def test_regularizers():
    k = torch.tensor([[0.5, -0.05, 0.2, -0.3]])
    assert torch.allclose(squash_kernel(k, 0.1), torch.tensor([[0.4, 0.0, 0.1, -0.2]]))
    k = torch.arange(6.0).view(1, 6)
    assert torch.allclose(smooth_kernel(k, 3), torch.tensor([[0.5, 1, 2, 3, 4, 4.5]]))
    assert smooth_kernel(k, 4).shape == k.shape
    u = torch.randn(1, 1, 6, dtype=torch.float64)
    kk = torch.randn(1, 6, dtype=torch.float64)
    assert_close(long_conv(u, kk, squash=0.1, smooth=3), direct(u, smooth_kernel(squash_kernel(kk, 0.1), 3)), 1e-12)


def test_streaming_step_equals_full():
    u = torch.randn(2, 3, 40, dtype=torch.float64)
    k = torch.randn(3, 7, dtype=torch.float64)
    D = torch.randn(3, dtype=torch.float64)
    s, ys = None, []
    for t in range(40):
        yt, s = long_conv_step(u[..., t], k, s, D)
        ys.append(yt)
    assert isinstance(s, LongConvState) and s.t == 40 and s.buffer.shape == (2, 3, 7)
    assert_close(torch.stack(ys, -1), direct(u, k, D), 1e-12)


@settings(deadline=None, max_examples=15)
@given(L=st.integers(1, 70), frac=st.floats(0.01, 1.0), D=st.integers(1, 4), seed=st.integers(0, 999))
def test_property_fft_equals_direct(L, frac, D, seed):
    g = torch.Generator().manual_seed(seed)
    Lk = max(1, int(L * frac))
    u = torch.randn(1, D, L, generator=g, dtype=torch.float64)
    k = torch.randn(D, Lk, generator=g, dtype=torch.float64)
    assert_close(long_conv(u, k), direct(u, k), 1e-11)
