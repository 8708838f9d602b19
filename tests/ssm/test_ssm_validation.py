import re

import pytest
import torch

from anyattn.ssm import (long_conv, long_conv_step, s4d_kernel, s4d_lin_init, s4d_step, selective_scan,
                         selective_scan_step, ssd, ssd_step)


def ss_args(B=2, D=4, N=3, L=5):
    return dict(u=torch.randn(B, D, L), delta=torch.rand(B, D, L), A=-torch.rand(D, N), B=torch.randn(B, N, L),
                C=torch.randn(B, N, L))


def raises(exc, msg, fn, *a, **k):
    with pytest.raises(exc, match=re.escape(msg)):
        fn(*a, **k)


def test_selective_scan_messages():
    a = ss_args()
    f = lambda **o: selective_scan(**{**a, **o})
    raises(ValueError, "u must have 3 dimensions, got shape (2, 4)", f, u=torch.randn(2, 4))
    raises(TypeError, "u must be a torch.Tensor, got list", f, u=[1.0])
    raises(TypeError, "u must have a floating dtype", f, u=torch.ones(2, 4, 5, dtype=torch.int64))
    raises(ValueError, "delta must have shape (B, D, L) = (2, 4, 5), got (2, 4, 6)", f, delta=torch.rand(2, 4, 6))
    raises(ValueError, "A must have shape (D, N) with D = 4, got (3, 3)", f, A=torch.randn(3, 3))
    raises(TypeError, "A must be real", f, A=torch.randn(4, 3, dtype=torch.complex64))
    raises(ValueError, "B must have shape (B, N, L) = (2, 3, 5), got (2, 2, 5)", f, B=torch.randn(2, 2, 5))
    raises(ValueError, "C must have shape (B, N, L) = (2, 3, 5) or (B, G, N, L) with D = 4 divisible by G, "
                       "got (2, 3, 3, 5)", f, C=torch.randn(2, 3, 3, 5))
    raises(ValueError, "D must have shape (D,) = (4,), got (5,)", f, D=torch.randn(5))
    raises(ValueError, "z must have shape (B, D, L) = (2, 4, 5), got (2, 4, 4)", f, z=torch.randn(2, 4, 4))
    raises(ValueError, "delta_bias must have shape (D,) = (4,), got (1,)", f, delta_bias=torch.randn(1))
    raises(ValueError, "initial_state must have shape (B, D, N) = (2, 4, 3), got (2, 4, 4)", f,
           initial_state=torch.randn(2, 4, 4))
    raises(ValueError, "mode must be one of ('chunk', 'recurrent'), got 'fast'", f, mode="fast")
    raises(ValueError, "chunk_size must be >= 1, got 0", f, chunk_size=0)
    raises(TypeError, "chunk_size must be an int, got float", f, chunk_size=2.0)
    raises(ValueError, "compile must be True, False or 'auto', got 'yes'", f, compile="yes")


def test_selective_scan_step_messages():
    raises(ValueError, "state must have shape (B, D, N) = (2, 4, 3), got (2, 4)", selective_scan_step,
           torch.randn(2, 4), torch.randn(2, 4), torch.rand(2, 4), -torch.rand(4, 3), torch.randn(2, 3), torch.randn(2, 3))
    raises(ValueError, "B must have shape (B, N) = (2, 3), got (2, 5)", selective_scan_step,
           None, torch.randn(2, 4), torch.rand(2, 4), -torch.rand(4, 3), torch.randn(2, 5), torch.randn(2, 3))


def test_ssd_messages():
    x, dt, A = torch.randn(2, 5, 4, 3), torch.rand(2, 5, 4), -torch.rand(4)
    Bm = torch.randn(2, 5, 2, 6)
    raises(ValueError, "x must have 4 dimensions, got shape (2, 5, 4)", ssd, torch.randn(2, 5, 4), dt, A, Bm, Bm)
    raises(ValueError, "dt must have shape (B, L, H) = (2, 5, 4), got (2, 5, 3)", ssd, x, torch.rand(2, 5, 3), A, Bm, Bm)
    raises(ValueError, "A must have shape (H,) = (4,), got (4, 1)", ssd, x, dt, A[:, None], Bm, Bm)
    raises(ValueError, "B must have shape (B, L, G, N) with B = 2, L = 5 and H = 4 divisible by G, got (2, 5, 3, 6)",
           ssd, x, dt, A, torch.randn(2, 5, 3, 6), Bm)
    raises(ValueError, "initial_state must have shape (B, H, P, N) = (2, 4, 3, 6), got (2, 4, 6, 3)", ssd, x, dt, A, Bm,
           Bm, initial_state=torch.randn(2, 4, 6, 3))
    raises(ValueError, "state must have shape (B, H, P, N) = (2, 4, 3, 6), got (2, 4, 3, 5)", ssd_step,
           torch.randn(2, 4, 3, 5), x[:, 0], dt[:, 0], A, Bm[:, 0], Bm[:, 0])


def test_s4d_and_long_conv_messages():
    A = s4d_lin_init(3, 2)
    raises(ValueError, "A must have shape (H, N) with H = 4 (log_dt's length), got (3, 2)", s4d_kernel,
           torch.zeros(4), A, A, A, 8)
    raises(ValueError, "C must have shape (H, N) = (3, 2), got (3, 3)", s4d_kernel, torch.zeros(3), A, A,
           torch.ones(3, 3), 8)
    raises(ValueError, "L must be >= 1, got 0", s4d_kernel, torch.zeros(3), A, A, A, 0)
    raises(ValueError, "log_dt must have shape (H,) = (2,), got (3,)", s4d_step, None, torch.randn(1, 2), torch.zeros(3),
           A, A, A)
    u = torch.randn(2, 3, 10)
    raises(ValueError, "kernel length L_k must be in [1, L] with L = 10 (u's length), got 11", long_conv, u,
           torch.randn(3, 11))
    raises(ValueError, "kernel must have shape (D, L_k) with D = 3, got (4, 5)", long_conv, u, torch.randn(4, 5))
    raises(ValueError, "kernel must have shape (2, D, L_k) with D = 3 when bidirectional, got (3, 5)", long_conv, u,
           torch.randn(3, 5), bidirectional=True)
    raises(TypeError, "kernel must have a floating dtype", long_conv, u, torch.ones(3, 5, dtype=torch.int32))
    raises(TypeError, "state must be a LongConvState or None, got dict", long_conv_step, u[..., 0], torch.randn(3, 4), {})
