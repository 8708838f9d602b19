"""Optional backends (anyattn.backends) against anyattn's oracles on the same inputs.

CPU: the layout conversions, run with the libraries' CPU paths (NATTEN's CPU forward, fla's pure-torch
`naive_chunk_*` references). CUDA (skipped without one, and per library when it is not installed): the
fused kernels through `backend="auto"` against anyattn's float64 references, outputs and gradients.
"""
import pytest
import torch

import anyattn
from anyattn.backends import fla as fla_b
from anyattn.backends import mamba as mamba_b
from anyattn.backends import natten as natten_b
from anyattn.backends import report
from anyattn.linear.fla_reference import available as fla_naive_available, load_naive
from anyattn.masks.neighborhood import normalize_args
from helpers import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _r(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_report_and_cpu_choices():
    rep = report("cpu")
    assert set(rep) == {"natten", "fla", "mamba"} and all(v != "available" for v in rep.values())
    x = torch.zeros(1, 2, 8, 4)
    assert anyattn.linear.backend_choice("gla", x, x, x).backend == "anyattn"
    assert anyattn.ssm.backend_choice(torch.zeros(1, 2, 8)).backend == "anyattn"
    with pytest.raises(ValueError, match="backend='fla' cannot run"):
        anyattn.linear.gla(x, x, x, x, backend="fla")
    with pytest.raises(ValueError, match="backend must be one of"):
        anyattn.linear.gla(x, x, x, x, backend="triton")


# --------------------------------------------------------------------------------------- NATTEN

@pytest.mark.cpu_only
@pytest.mark.skipif(natten_b.import_error() is not None, reason="natten not installed")
@pytest.mark.parametrize("spatial,kernel,dilation,causal", [((24,), 5, 2, False), ((6, 8), (3, 5), 1, (True, False))])
def test_natten_layout_conversion_cpu(spatial, kernel, dilation, causal):
    """The conversion around NATTEN's functional API, with NATTEN's CPU (forward) path, against
    anyattn's neighborhood engine."""
    import natten
    q, k, v = (_r(2, 3, *spatial, 8, seed=s) for s in range(3))
    ks, ds, ss, cs = normalize_args(spatial, kernel, dilation, 1, causal)
    fn = {1: natten.na1d, 2: natten.na2d}[len(spatial)]
    out, lse = natten_b.neighborhood(q, k, v, ks, ds, ss, cs, scale=0.3, return_lse=True, kernel=fn)
    want, want_lse = anyattn.neighborhood(q, k, v, kernel, dilation, 1, causal, scale=0.3, return_lse=True,
                                          backend="sdpa")
    assert_close(out, want, torch.float32, "natten out")
    assert_close(lse, want_lse, torch.float32, "natten lse")


@pytest.mark.cuda_only
@pytest.mark.skipif(natten_b.import_error() is not None, reason="natten not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_natten_cuda_against_oracle(dtype):
    q, k, v = (_r(1, 4, 12, 16, 32, seed=s).cuda().to(dtype).requires_grad_() for s in range(3))
    assert anyattn.softmax.neighborhood.backend_choice(q).backend == "natten"
    out = anyattn.neighborhood(q, k, v, (3, 5), (2, 1), is_causal=(False, True))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = anyattn.neighborhood(q64, k64, v64, (3, 5), (2, 1), is_causal=(False, True), backend="blocked")
    tol = (2e-2, 2e-2) if dtype == torch.bfloat16 else (2e-5, 2e-5)
    assert_close(out, want, dtype, "natten out", tol)
    do = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), do.to(dtype)), torch.autograd.grad(want, (q64, k64, v64), do)):
        assert_close(g, w, dtype, "natten grad", tol)


# ------------------------------------------------------------------------------------------ fla

def _linear_inputs(op, B=1, H=2, N=80, K=16, V=12, dtype=torch.float32):
    q, k = _r(B, H, N, K, seed=1, dtype=dtype), _r(B, H, N, K, seed=2, dtype=dtype)
    k = k / k.norm(dim=-1, keepdim=True)
    v = _r(B, H, N, V, seed=3, dtype=dtype)
    g = -torch.rand(B, H, N, K, generator=torch.Generator().manual_seed(4)) * 0.2
    gs = -torch.rand(B, H, N, generator=torch.Generator().manual_seed(5)) * 0.2
    beta = torch.rand(B, H, N, generator=torch.Generator().manual_seed(6))
    S0 = _r(B, H, K, V, seed=7) * 0.1
    args = {"gla": (g,), "delta_rule": (beta,), "gated_delta_rule": (gs, beta), "kda": (g, beta)}[op]
    return q, k, v, args, S0


@pytest.mark.cpu_only
@pytest.mark.skipif(not fla_naive_available()[0], reason="fla-core not installed")
@pytest.mark.parametrize("op,naive", [("gated_delta_rule", "naive_chunk_gated_delta_rule"), ("kda", "naive_chunk_kda")])
def test_fla_layout_conversion_cpu(op, naive):
    """The conversion around fla's chunk signature, run with fla's pure-torch chunk reference."""
    q, k, v, args, S0 = _linear_inputs(op, N=128, dtype=torch.float64)  # naive_chunk: N % 64 == 0
    g, beta = args
    fn = getattr(load_naive(op), naive)
    o, S = fla_b.chunk(op, q, k, v, g, beta, scale=0.25, initial_state=S0, output_final_state=True, kernel=fn)
    want, want_S = getattr(anyattn.linear, op)(q, k, v, g, beta, scale=0.25, initial_state=S0,
                                                output_final_state=True)
    assert_close(o, want, torch.float32, f"{op} out")
    assert_close(S, want_S, torch.float32, f"{op} state")


@pytest.mark.cuda_only
@pytest.mark.skipif(fla_b.import_error() is not None, reason="fla-core (with triton) not installed")
@pytest.mark.parametrize("op", ["gla", "delta_rule", "gated_delta_rule", "kda"])
def test_fla_cuda_against_oracle(op):
    q, k, v, args, S0 = _linear_inputs(op, N=200, K=64, V=64)
    q, k, v, S0 = (x.cuda().requires_grad_() for x in (q, k, v, S0))
    args = tuple(a.cuda() for a in args)
    fn = getattr(anyattn.linear, op)
    assert anyattn.linear.backend_choice(op, q, k, v).backend == "fla"
    o, S = fn(q, k, v, *args, initial_state=S0, output_final_state=True)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v, S0)]
    want, want_S = fn(ref[0], ref[1], ref[2], *(a.double() for a in args), initial_state=ref[3],
                      output_final_state=True, mode="recurrent")
    tol = (2e-3, 2e-3)  # fla's kernels use tf32 matmuls
    assert_close(o, want, torch.float32, f"{op} out", tol)
    assert_close(S, want_S, torch.float32, f"{op} state", tol)
    do = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(o, (q, k, v, S0), do.float()), torch.autograd.grad(want, ref, do)):
        assert_close(g, w, torch.float32, f"{op} grad", tol)


# ---------------------------------------------------------------------------------------- mamba

@pytest.mark.cuda_only
@pytest.mark.skipif(mamba_b.import_error() is not None, reason="mamba-ssm not installed")
def test_mamba_cuda_against_oracle():
    Bsz, Dm, L, N = 2, 16, 300, 8
    u, delta = _r(Bsz, Dm, L, seed=1), _r(Bsz, Dm, L, seed=2) * 0.5
    A = -torch.rand(Dm, N, generator=torch.Generator().manual_seed(3)) - 0.5
    Bm, Cm = _r(Bsz, N, L, seed=4), _r(Bsz, N, L, seed=5)
    D, z, bias = _r(Dm, seed=6), _r(Bsz, Dm, L, seed=7), _r(Dm, seed=8) * 0.1
    xs = [x.cuda().requires_grad_() for x in (u, delta, A, Bm, Cm, D, z, bias)]
    assert anyattn.ssm.backend_choice(xs[0]).backend == "mamba"
    y, last = anyattn.ssm.selective_scan(*xs, delta_softplus=True, output_final_state=True)
    ref = [x.detach().double().requires_grad_() for x in xs]
    want, want_last = anyattn.ssm.selective_scan(*ref, delta_softplus=True, output_final_state=True,
                                                 mode="recurrent")
    tol = (1e-3, 1e-3)
    assert_close(y, want, torch.float32, "scan out", tol)
    assert_close(last, want_last, torch.float32, "scan state", tol)
    dy = torch.randn_like(want)
    for g, w in zip(torch.autograd.grad(y, xs, dy.float()), torch.autograd.grad(want, ref, dy)):
        assert_close(g, w, torch.float32, "scan grad", tol)
