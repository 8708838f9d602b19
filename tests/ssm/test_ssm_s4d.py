import math

import pytest
import torch

from anyattn.ssm import s4d, s4d_inv_init, s4d_kernel, s4d_lin_init, s4d_ref, s4d_step

from _ssm_helpers import assert_close, grads


def params(H=3, N=4, init="lin", seed=0):
    g = torch.Generator().manual_seed(seed)
    A = (s4d_lin_init if init == "lin" else s4d_inv_init)(H, N, dtype=torch.complex128)
    B = torch.randn(H, N, generator=g, dtype=torch.complex128)
    C = torch.randn(H, N, generator=g, dtype=torch.complex128)
    log_dt = torch.log(torch.rand(H, generator=g, dtype=torch.float64) * 0.09 + 0.01)
    D = torch.randn(H, generator=g, dtype=torch.float64)
    return [x.requires_grad_() for x in (log_dt, A, B, C, D)]


def test_initializers():
    A = s4d_lin_init(2, 3, dtype=torch.complex128)
    assert torch.allclose(A[1], torch.tensor([-0.5 + 0j, -0.5 + 1j * math.pi, -0.5 + 2j * math.pi], dtype=torch.complex128))
    A = s4d_inv_init(1, 4, dtype=torch.complex128)
    n = torch.arange(4, dtype=torch.float64)
    assert torch.allclose(A[0].imag, 4 / math.pi * (4 / (2 * n + 1) - 1))
    assert (A.real == -0.5).all()


def test_kernel_formula():
    log_dt, A, B, C, _ = params()
    K = s4d_kernel(log_dt, A, B, C, 10, block=3)
    dt = torch.exp(log_dt)[:, None]
    want = torch.stack([2 * (C * B * (torch.exp(dt * A) - 1) / A * torch.exp(l * dt * A)).sum(-1).real
                        for l in range(10)], -1)
    assert K.dtype == torch.float64
    assert_close(K, want, 1e-12)


@pytest.mark.parametrize("init", ["lin", "inv"])
def test_s4d_conv_matches_recurrence_float64(init):
    p = params(init=init)
    u = torch.randn(2, 3, 33, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 4, dtype=torch.complex128, requires_grad=True)
    ins = [u, h0] + p
    (y, h), g = grads(lambda: s4d(u, *p, initial_state=h0, output_final_state=True), ins)
    (yr, hr), gr = grads(lambda: s4d_ref(u, *p, initial_state=h0), ins)
    assert_close(y, yr, 1e-10, "y")
    assert_close(h, hr, 1e-10, "state")
    for name, a, b in zip(["u", "h0", "log_dt", "A", "B", "C", "D"], g, gr):
        assert_close(a, b, 1e-9, f"grad {name}")


def test_s4d_float32_and_steps():
    p = params()
    u = torch.randn(2, 3, 20, dtype=torch.float64)
    with torch.no_grad():
        yr, hr = s4d_ref(u, *p)
        p32 = [x.detach().float() if not x.is_complex() else x.detach().to(torch.complex64) for x in p]
        y = s4d(u.float(), *p32)
        assert y.dtype == torch.float32
        assert_close(y.double(), yr, 1e-4)
        s, ys = None, []
        for t in range(20):
            yt, s = s4d_step(s, u[..., t], *p)
            ys.append(yt)
    assert_close(torch.stack(ys, -1), yr, 1e-12)
    assert_close(s, hr, 1e-12)
