"""Chimera's 2-D selective SSM (issue 16): the row algorithm (on `selective_scan`) and the wavefront
oracle against a cell-by-cell double loop written here from the equations (float64), gradients of every
input (rows vs wavefront), streaming over time (initial / final states, `chimera_step`), the uncoupled
case against `selective_scan_ref`, and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.ssm import chimera, chimera_step, selective_scan_ref


def _inputs(B, D, V, T, N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(B, D, V, T)
    dt, dv = u(B, D, V, T) * 0.5 + 0.05, u(B, D, V, T) * 0.5 + 0.05
    A = (-u(D, N) * 2 - 0.1, r(D, N) * 0.5, r(D, N) * 0.5, -u(D, N) * 2 - 0.1)
    B1, B2, C1, C2 = (r(B, N, V, T) for _ in range(4))
    return x, dt, dv, A, B1, B2, C1, C2, r(D)


def _cells(x, dt, dv, A, B1, B2, C1, C2, D, h0=None):
    """The recurrence cell by cell (v outer, t inner), from the equations in the module doc."""
    A1, A2, A3, A4 = A
    Bs, Dm, V, T = x.shape
    N = A1.shape[1]
    h1 = x.new_zeros(Bs, Dm, V, T, N)
    h2 = x.new_zeros(Bs, Dm, V, T, N)
    y = x.new_zeros(Bs, Dm, V, T)
    zero = x.new_zeros(Bs, Dm, N)
    for v in range(V):
        for t in range(T):
            left1 = h1[:, :, v, t - 1] if t else (zero if h0 is None else h0[0][:, :, v])
            left2 = h2[:, :, v, t - 1] if t else (zero if h0 is None else h0[1][:, :, v])
            up1, up2 = (h1[:, :, v - 1, t], h2[:, :, v - 1, t]) if v else (zero, zero)
            a, b, xx = dt[:, :, v, t, None], dv[:, :, v, t, None], x[:, :, v, t, None]
            h1[:, :, v, t] = torch.exp(a * A1) * left1 + a * (A2 * left2 + B1[:, None, :, v, t] * xx)
            h2[:, :, v, t] = torch.exp(b * A4) * up2 + b * (A3 * up1 + B2[:, None, :, v, t] * xx)
            y[:, :, v, t] = (h1[:, :, v, t] * C1[:, None, :, v, t]).sum(-1) + \
                (h2[:, :, v, t] * C2[:, None, :, v, t]).sum(-1) + D * x[:, :, v, t]
    return y


@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 2), (1, 2, 1, 5, 3), (1, 2, 5, 1, 2)])
def test_rows_and_wavefront_match_the_cell_loop(shape):
    args = _inputs(*shape)
    ref = _cells(*args)
    torch.testing.assert_close(chimera(*args[:8], D=args[8], mode="rows"), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(chimera(*args[:8], D=args[8], mode="wavefront"), ref, rtol=1e-10, atol=1e-10)


def test_gradients_rows_vs_wavefront():
    x, dt, dv, A, B1, B2, C1, C2, D = _inputs(2, 2, 3, 5, 2)
    leaves = [t.clone().requires_grad_() for t in (x, dt, dv, *A, B1, B2, C1, C2, D)]
    h0 = tuple(torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def run(mode):
        x, dt, dv, a1, a2, a3, a4, B1, B2, C1, C2, D = leaves
        y, (h1, h2) = chimera(x, dt, dv, (a1, a2, a3, a4), B1, B2, C1, C2, D, initial_state=h0,
                              output_final_state=True, mode=mode)
        g = torch.Generator().manual_seed(7)
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in (y, h1, h2))
        return torch.autograd.grad(loss, leaves + list(h0))

    for a, b in zip(run("rows"), run("wavefront")):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_streaming_over_time():
    x, dt, dv, A, B1, B2, C1, C2, D = _inputs(2, 2, 3, 9, 2, seed=2)
    full, last = chimera(x, dt, dv, A, B1, B2, C1, C2, D, output_final_state=True)
    y1, st_ = chimera(x[..., :4], dt[..., :4], dv[..., :4], A, *(t[..., :4] for t in (B1, B2, C1, C2)), D,
                      output_final_state=True)
    y2 = chimera(x[..., 4:], dt[..., 4:], dv[..., 4:], A, *(t[..., 4:] for t in (B1, B2, C1, C2)), D,
                 initial_state=st_)
    torch.testing.assert_close(torch.cat([y1, y2], -1), full, rtol=1e-10, atol=1e-10)
    state, ys = None, []
    for t in range(9):
        yt, state = chimera_step(state, x[..., t], dt[..., t], dv[..., t], A, B1[..., t], B2[..., t],
                                 C1[..., t], C2[..., t], D)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, -1), full, rtol=1e-10, atol=1e-10)
    for a, b in zip(state, last):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_uncoupled_rows_are_mamba_scans():
    # A2 = A3 = 0 and C2 = 0: every variate row is an independent selective scan with (dt, A1, B1, C1).
    x, dt, dv, (A1, _, _, A4), B1, B2, C1, _, D = _inputs(1, 3, 4, 7, 2, seed=4)
    z = torch.zeros_like(A1)
    y = chimera(x, dt, dv, (A1, z, z, A4), B1, B2, C1, torch.zeros_like(C1), D)
    for v in range(4):
        ref = selective_scan_ref(x[:, :, v], dt[:, :, v], A1, B1[:, :, v], C1[:, :, v], D)
        torch.testing.assert_close(y[:, :, v], ref, rtol=1e-10, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(B=st.integers(1, 2), D=st.integers(1, 3), V=st.integers(1, 4), T=st.integers(1, 7), N=st.integers(1, 3))
def test_property_shapes(B, D, V, T, N):
    args = _inputs(B, D, V, T, N, seed=V * 10 + T)
    y = chimera(*args[:8], D=args[8])
    assert y.shape == (B, D, V, T)
    torch.testing.assert_close(y, chimera(*args[:8], D=args[8], mode="wavefront"), rtol=1e-10, atol=1e-10)


def test_float32_and_validation():
    args = _inputs(1, 2, 3, 8, 2)
    y32 = chimera(*(t.float() for t in args[:3]), tuple(a.float() for a in args[3]),
                  *(t.float() for t in args[4:8]), D=args[8].float())
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), chimera(*args[:8], D=args[8]), rtol=1e-4, atol=1e-4)
    x, dt, dv, A, B1, B2, C1, C2, D = args
    with pytest.raises(ValueError, match="x must have 4"):
        chimera(x[0], dt, dv, A, B1, B2, C1, C2)
    with pytest.raises(ValueError, match="delta_v"):
        chimera(x, dt, dv[..., :3], A, B1, B2, C1, C2)
    with pytest.raises(ValueError, match="four matrices"):
        chimera(x, dt, dv, A[:3], B1, B2, C1, C2)
    with pytest.raises(ValueError, match="A3"):
        chimera(x, dt, dv, (A[0], A[1], A[2][:, :1], A[3]), B1, B2, C1, C2)
    with pytest.raises(ValueError, match="C2"):
        chimera(x, dt, dv, A, B1, B2, C1, C2[:, :1])
    with pytest.raises(ValueError, match="mode"):
        chimera(x, dt, dv, A, B1, B2, C1, C2, mode="columns")
    with pytest.raises(ValueError, match="initial_state"):
        chimera(x, dt, dv, A, B1, B2, C1, C2, initial_state=x)
    with pytest.raises(TypeError, match="floating"):
        chimera(x.long(), dt, dv, A, B1, B2, C1, C2)
