import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from anyattn.ssm import selective_scan, selective_scan_fn, selective_scan_step

from _ssm_helpers import assert_close, grads


def make(B=2, D=6, N=4, L=37, G=None, dtype=torch.float64, seed=0, delta_scale=1.0, extras=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    bc = (B, N, L) if G is None else (B, G, N, L)
    t = dict(u=r(B, D, L), delta=r(B, D, L) * delta_scale, A=-torch.rand(D, N, generator=g, dtype=torch.float64) * 3,
             B=r(*bc), C=r(*bc))
    if extras:
        t.update(D=r(D), z=r(B, D, L), delta_bias=r(D) * 0.5, initial_state=r(B, D, N))
    return {k: v.to(dtype).requires_grad_() for k, v in t.items()}


def naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """mamba_ssm's selective_scan_ref semantics, written out independently (float64 loop)."""
    Bsz, Dm, L = u.shape
    dt = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = F.softplus(dt)
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    rep = Dm // B.shape[1]
    B, C = B.repeat_interleave(rep, 1), C.repeat_interleave(rep, 1)     # (B, D, N, L)
    x = torch.zeros(Bsz, Dm, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(L):
        x = torch.exp(dt[:, :, t, None] * A) * x + dt[:, :, t, None] * B[..., t] * u[:, :, t, None]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[..., t]))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, x


def run(t, mode, chunk_size=8, softplus=True):
    return selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t.get("D"), t.get("z"), t.get("delta_bias"),
                          softplus, initial_state=t.get("initial_state"), output_final_state=True, mode=mode,
                          chunk_size=chunk_size)


@pytest.mark.parametrize("G", [None, 1, 3])
@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunk_matches_recurrence_float64(G, chunk_size):
    t = make(G=G)
    ins = list(t.values())
    (y, last), gc = grads(lambda: run(t, "chunk", chunk_size), ins)
    (yr, lastr), gr = grads(lambda: run(t, "recurrent"), ins)
    assert_close(y, yr, 1e-10, "y")
    assert_close(last, lastr, 1e-10, "last_state")
    for name, a, b in zip(t, gc, gr):
        assert_close(a, b, 1e-9, f"grad {name}")


def test_recurrence_matches_naive_reference():
    t = make(G=2)
    y, last = run(t, "recurrent")
    yn, lastn = naive(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True,
                      t["initial_state"])
    assert_close(y, yn, 1e-12, "y")
    assert_close(last, lastn, 1e-12, "last")


def test_float32_against_float64():
    t64 = make(L=50, extras=True)
    t32 = {k: v.detach().float().requires_grad_() for k, v in t64.items()}
    (y, last), g32 = grads(lambda: run(t32, "chunk", 16), list(t32.values()))
    (yr, lastr), g64 = grads(lambda: run(t64, "recurrent"), list(t64.values()))
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    assert_close(y.double(), yr, 1e-4, "y")
    assert_close(last.double(), lastr, 1e-4, "last")
    for name, a, b in zip(t64, g32, g64):
        assert_close(a.double(), b, 1e-4, f"grad {name}")


def test_large_decays_are_safe():
    """Huge |A| * delta spans force smaller chunks (down to 1): no overflow, still exact."""
    t = make(L=40, delta_scale=30.0)
    with torch.no_grad():
        t["A"].mul_(50)
        for dtype in (torch.float64, torch.float32):
            tt = {k: v.to(dtype) for k, v in t.items()}
            y, last = run(tt, "chunk", 32, softplus=True)
            yr, lastr = run({k: v.double() for k, v in t.items()}, "recurrent")
            assert torch.isfinite(y).all()
            assert_close(y.double(), yr, 1e-10 if dtype == torch.float64 else 1e-4, str(dtype))


def test_steps_equal_full_call():
    t = make(G=2, L=11)
    with torch.no_grad():
        y, last = run(t, "chunk")
        s = t["initial_state"]
        ys = []
        for i in range(t["u"].shape[-1]):
            yi, s = selective_scan_step(s, t["u"][..., i], t["delta"][..., i], t["A"], t["B"][..., i], t["C"][..., i],
                                        t["D"], t["z"][..., i], t["delta_bias"], True)
            ys.append(yi)
    assert_close(torch.stack(ys, -1), y, 1e-12, "y")
    assert_close(s, last, 1e-12, "state")


def test_mamba_ssm_compatible_signature():
    t = make(extras=False)
    with torch.no_grad():
        y = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"])
        y2, last = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], None, None, None, False, True)
        y3, last3 = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], return_last_state=True)
        yn, lastn = naive(t["u"], t["delta"], t["A"], t["B"], t["C"])
    assert isinstance(y, torch.Tensor)
    for a in (y, y2, y3):
        assert_close(a, yn, 1e-10)
    assert_close(last, lastn, 1e-10)
    assert_close(last3, lastn, 1e-10)


def test_low_precision_output_dtype_and_fp32_state():
    t = make(extras=False, dtype=torch.bfloat16)
    with torch.no_grad():
        y, last = selective_scan(t["u"], t["delta"], t["A"].float(), t["B"], t["C"], output_final_state=True,
                                 delta_softplus=True)
        yr, _ = naive(*(t[k].double() for k in ("u", "delta", "A", "B", "C")), delta_softplus=True)
    assert y.dtype == torch.bfloat16 and last.dtype == torch.float32
    assert_close(y.double(), yr, 3e-2)


@settings(deadline=None, max_examples=15)
@given(B=st.integers(1, 2), D=st.integers(1, 5), N=st.integers(1, 4), L=st.integers(1, 40),
       G=st.sampled_from([None, 1]), chunk=st.sampled_from([1, 2, 5, 16]), seed=st.integers(0, 1000))
def test_property_chunk_equals_recurrence(B, D, N, L, G, chunk, seed):
    t = make(B=B, D=D, N=N, L=L, G=G, seed=seed)
    with torch.no_grad():
        y, last = run(t, "chunk", chunk)
        yr, lastr = run(t, "recurrent")
    assert_close(y, yr, 1e-10, "y")
    assert_close(last, lastr, 1e-10, "last")
