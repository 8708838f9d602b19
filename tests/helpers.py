"""Shared test helpers: random inputs, the float64 oracle, and comparison of outputs and gradients."""
from __future__ import annotations

import torch

import anyattn

TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2),
       torch.float16: (5e-3, 5e-3)}


def make_qkv(B, H, H_kv, N_q, N_k, D, D_v, dtype=torch.float64, seed=0, scale_logits=1.0, contiguous=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if not contiguous:
            # Same values, non-contiguous layout: stored as (B, N, H, D) and transposed.
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.to(dtype)

    q = (r(B, H, N_q, D) * scale_logits).requires_grad_()
    k = r(B, H_kv, N_k, D).requires_grad_()
    v = r(B, H_kv, N_k, D_v).requires_grad_()
    return q, k, v


def run_with_grads(method, q, k, v, seed=1, **kwargs):
    """Out, lse and the gradients of (q, k, v) for a fixed random cotangent on out and on lse."""
    out, lse = anyattn.attention(q, k, v, method=method, return_lse=True, **kwargs)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    dl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    finite = torch.isfinite(lse)
    loss = (out.float() * do.float()).sum() + (torch.where(finite, lse, 0.0) * dl).float().sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    return out, lse, grads


def oracle(q, k, v, **kwargs):
    """The float64 reference on float64 copies of the inputs."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    return run_with_grads("reference", q64, k64, v64, **kwargs)


def assert_close(got, want, dtype, what="", tol=None):
    rtol, atol = tol or TOL[dtype]
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def check_against_oracle(method, q, k, v, tol=None, **kwargs):
    """Compare out, LSE and (dq, dk, dv) of `method` with the float64 oracle; `tol=(rtol, atol)`
    overrides the per-dtype tolerance."""
    out, lse, grads = run_with_grads(method, q, k, v, **kwargs)
    r_out, r_lse, r_grads = oracle(q, k, v, **{k_: v_ for k_, v_ in kwargs.items() if k_ in ("mask", "bias", "scale")})
    dtype = q.dtype
    assert torch.isfinite(out).all(), "output has NaN/inf"
    assert_close(out, r_out, dtype, f"{method} out", tol)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse)), f"{method}: -inf LSE rows differ"
    fin = torch.isfinite(r_lse)
    assert_close(lse[fin], r_lse[fin], dtype, f"{method} lse", tol)
    for name, g, rg in zip("qkv", grads, r_grads):
        assert torch.isfinite(g).all(), f"{method} d{name} has NaN/inf"
        assert_close(g, rg, dtype, f"{method} d{name}", tol)


def quick_cases(workloads, name):
    """The quick cases of a bench workload, checked for shape: a non-empty list of `Case`s, each with
    its baseline among the contenders and a positive FLOP count."""
    from anyattn.bench.case import Case
    cases = workloads[name](True)
    assert cases and all(isinstance(c, Case) for c in cases)
    for case in cases:
        assert case.baseline in case.contenders and case.flops > 0
    return cases
