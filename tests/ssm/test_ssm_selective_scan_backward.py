"""The chunked selective scan's hand-written backward against the autograd path it replaced (per-block
recomputation under autograd) and against the float64 token loop: gradients of every input (u, delta, A,
B, C, D, z, delta_bias, initial state) with cotangents on y, the last state or both, across channel blocks
(block size shrunk), groups, chunk sizes and odd lengths; then bf16 / fp16 against float64."""
import importlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

from anyattn.backward_switch import autograd_backward
from anyattn.ssm import selective_scan, selective_scan_step
from test_ssm_selective_scan import make, run

scan_module = importlib.import_module("anyattn.ssm.selective_scan")


def _grads(t, mode, chunk_size, which, seed, autograd=False, softplus=True):
    names = [n for n, x in t.items() if x.requires_grad]
    with autograd_backward(autograd):
        y, last = run(t, mode, chunk_size, softplus=softplus)
    gen = torch.Generator().manual_seed(seed)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64) * (which != "state")
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64) * (which != "output")
    loss = (y * wy.to(y.dtype)).sum() + (last * wl.to(last.dtype)).sum()
    return y, last, dict(zip(names, torch.autograd.grad(loss, [t[n] for n in names])))


def _close(a, b, what, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@settings(max_examples=15, deadline=None)
@given(B=st.integers(1, 2), D=st.sampled_from([1, 3, 6]), N=st.integers(1, 5), L=st.integers(1, 40),
       G=st.sampled_from([None, 1, 3]), chunk=st.sampled_from([1, 3, 8, 32]), extras=st.booleans(),
       which=st.sampled_from(["both", "output", "state"]), small_blocks=st.booleans(), seed=st.integers(0, 99))
def test_handwritten_backward_matches_autograd_and_oracle(B, D, N, L, G, chunk, extras, which, small_blocks, seed):
    if G == 3 and D % 3:
        D = 3
    t = make(B=B, D=D, N=N, L=L, G=G, seed=seed, extras=extras)
    # small blocks: several channel blocks per group (and whole-group blocks when a group is small)
    elems = B * N * 2 if small_blocks else scan_module._BLOCK_ELEMS
    with mock.patch.object(scan_module, "_BLOCK_ELEMS", elems):
        y1, l1, g1 = _grads(t, "chunk", chunk, which, seed)
        y2, l2, g2 = _grads(t, "chunk", chunk, which, seed, autograd=True)
    y3, l3, g3 = _grads(t, "recurrent", chunk, which, seed)
    _close(y1, y3, "y")
    _close(l1, l3, "last state")
    for name in g1:
        _close(g1[name], g2[name], f"grad of {name} vs autograd")
        _close(g1[name], g3[name], f"grad of {name} vs the token loop")


def test_large_decays_backward():
    """Spans that force chunks down to 1 token: finite gradients, equal to the token loop's."""
    t = make(L=30, delta_scale=30.0, extras=False)
    with torch.no_grad():
        t["A"].mul_(50)
    _, _, g1 = _grads(t, "chunk", 32, "both", 1)
    _, _, g2 = _grads(t, "recurrent", 32, "both", 1)
    for name in g1:
        assert torch.isfinite(g1[name]).all(), name
        _close(g1[name], g2[name], f"grad of {name}")


# Documented bound (docs/ssm.md): the scan runs in fp32 for bf16 / fp16 inputs (no matmuls), so the error
# against float64 is that of rounding the inputs' gradients and the output to the low precision.
LOW_PRECISION_BOUND = 1e-2


def _rel(a, b):
    b = b.detach()
    return float((a.detach().double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_bound(dtype):
    t = make(B=2, D=8, N=4, L=60, G=2, seed=3, extras=True)
    lo = {n: x.detach().to(dtype if n in ("u", "delta", "B", "C", "z") else torch.float32).requires_grad_()
          for n, x in t.items()}
    ref = {n: x.detach().double().requires_grad_() for n, x in lo.items()}
    y, last, g = _grads(lo, "chunk", 16, "both", 5)
    y_ref, last_ref, g_ref = _grads(ref, "recurrent", 16, "both", 5)
    assert y.dtype == dtype and last.dtype == torch.float32
    assert _rel(y, y_ref) <= LOW_PRECISION_BOUND and _rel(last, last_ref) <= LOW_PRECISION_BOUND
    for name in g:
        assert g[name].dtype == lo[name].dtype
        assert _rel(g[name], g_ref[name]) <= LOW_PRECISION_BOUND, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_steps(dtype):
    t = make(B=2, D=6, N=4, L=10, G=2, seed=4)
    lo = {n: x.detach().to(dtype if n in ("u", "delta", "B", "C", "z") else torch.float32) for n, x in t.items()}
    s, s_ref = lo["initial_state"], lo["initial_state"].double()
    for i in range(10):
        args = [lo[n][..., i] for n in ("u", "delta")] + [lo["A"]] + [lo[n][..., i] for n in ("B", "C")]
        y, s = selective_scan_step(s, *args, lo["D"], lo["z"][..., i], lo["delta_bias"], True)
        y_ref, s_ref = selective_scan_step(s_ref, *(a.double() for a in args), lo["D"].double(),
                                           lo["z"][..., i].double(), lo["delta_bias"].double(), True)
        assert y.dtype == dtype and s.dtype == torch.float32
        assert _rel(y, y_ref) <= LOW_PRECISION_BOUND
    assert _rel(s, s_ref) <= LOW_PRECISION_BOUND


def test_forward_only_call_keeps_no_graph():
    t = {n: x.detach() for n, x in make(L=20).items()}
    y = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    assert not y.requires_grad
