"""`lowrank_bias` (FlashBias): exact factor routes, the truncated-SVD route with its reported error,
GQA with per-head factors, precision of the ALiBi factors at long N in fp32 and bf16, and errors."""
from __future__ import annotations

import pytest
import torch

import anyattn
from anyattn import biases as B
from anyattn import masks as M

F64 = torch.float64


def _qkv(Bn, H, Hk, Nq, Nk, D, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_()
                 for s in ((Bn, H, Nq, D), (Bn, Hk, Nk, D), (Bn, Hk, Nk, Dv)))


def _grads(method, q, k, v, mask, bias, **opts):
    params = (q, k, v, *bias.tensors())
    out, lse = anyattn.attention(q, k, v, mask=mask, bias=bias, method=method, return_lse=True, **opts)
    g = torch.Generator().manual_seed(3)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + \
        (torch.where(torch.isfinite(lse), lse, 0.0) * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    return [out, lse] + list(torch.autograd.grad(loss, params, allow_unused=True))


def _assert_all_close(got, want, tol):
    for i, (a, b) in enumerate(zip(got, want)):
        if b is None:
            assert a is None or a.abs().max() == 0, i
            continue
        fin = torch.isfinite(b)
        torch.testing.assert_close(a[fin].double(), b[fin].double(), rtol=tol, atol=tol, msg=lambda m: f"item {i}: {m}")


@pytest.mark.parametrize("engine", ["auto", "blocked"])
@pytest.mark.parametrize("mask", [M.Causal(), M.Causal("top_left"), M.Causal() & M.KeyPadding(torch.tensor([9, 4]))])
def test_causal_alibi_rank2_and_rank4(engine, mask):
    q, k, v = _qkv(2, 4, 2, 6, 9, 8, 5)
    for slopes in (torch.tensor([0.5, 0.25, 0.125, 1.0], dtype=F64), torch.tensor([0.3, 0.7, 0.11, 0.9], dtype=F64)):
        bias = B.Alibi(slopes.clone().requires_grad_())
        rep = {}
        got = _grads("lowrank_bias", q, k, v, mask, bias, engine=engine, report=rep)
        want = _grads("reference", q, k, v, mask, bias)
        _assert_all_close(got, want, 1e-9)
        expect = "blocked" if engine == "blocked" or isinstance(mask, M.And) else "sdpa"
        assert rep["exact"] and rep["bias_rel_error"] == 0.0 and rep["engine"] == expect
        assert rep["rank"] == (2 if slopes[0] == 0.5 else 4)


def test_spatial_rank_d_plus_2_with_batched_coords_and_gqa():
    q, k, v = _qkv(2, 4, 2, 5, 8, 8, 8)
    coords = torch.randn(2, 5, 4, dtype=F64, requires_grad=True)
    kc = torch.randn(8, 4, dtype=F64, requires_grad=True)
    w = torch.rand(4, dtype=F64, requires_grad=True)
    bias = B.SpatialDistance(coords, w, key_coords=kc)
    rep = {}
    got = _grads("lowrank_bias", q, k, v, None, bias, report=rep)
    assert rep["rank"] == 6
    _assert_all_close(got, _grads("reference", q, k, v, None, bias), 1e-9)


def test_mixed_exact_and_residual_terms():
    """Factorable terms go into the concatenation; the others stay an additive (per-tile) bias."""
    q, k, v = _qkv(1, 2, 2, 7, 7, 8, 8)
    alibi = B.Alibi(torch.tensor([0.5, 0.3], dtype=F64, requires_grad=True))
    t5 = B.RelativePosition.t5(torch.randn(8, 2, dtype=F64, requires_grad=True), True, max_distance=10)
    for mask, engine in ((M.Causal(), "sdpa"), (M.SlidingWindow(3), "blocked")):
        rep = {}
        got = _grads("lowrank_bias", q, k, v, mask, alibi + t5, report=rep)
        # With return_lse and a residual that needs gradients, SDPA's LSE op would drop them: blocked.
        assert not rep["exact"] and rep["engine"] == "blocked"
        _assert_all_close(got, _grads("reference", q, k, v, mask, alibi + t5), 1e-9)
        out = anyattn.attention(q, k, v, mask=mask, bias=alibi + t5, method="lowrank_bias", report=rep)
        assert rep["engine"] == engine
        ref = anyattn.attention(q, k, v, mask=mask, bias=alibi + t5, method="reference")
        _assert_all_close([out] + list(torch.autograd.grad(out.sum(), t5.tensors())),
                          [ref] + list(torch.autograd.grad(ref.sum(), t5.tensors())), 1e-9)


def test_svd_route_reports_the_measured_error_and_smallest_rank():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(7 * 7, 2, generator=g, dtype=F64)
    bias = B.RelativePosition.swin(table, (4, 4))
    dense = bias.dense(16, 16)
    for tol in (0.5, 0.1, 1e-3):
        lr = B.lowrank(bias, 16, 16, tol=tol)
        approx = lr.bias.dense(16, 16)
        measured = ((dense - approx).square().sum((-2, -1)) / dense.square().sum((-2, -1))).sqrt().max()
        assert abs(float(measured) - lr.rel_error) < 1e-12
        assert lr.rel_error <= tol
        if lr.rank > 1:  # one rank less would miss the tolerance
            smaller = B.lowrank(bias, 16, 16, rank=lr.rank - 1)
            assert smaller.rel_error > tol
    with pytest.raises(ValueError, match="give rank= or tol=, not both"):
        B.lowrank(bias, 16, 16, rank=2, tol=0.1)
    with pytest.raises(ValueError, match="has no exact low-rank form here; pass rank= or tol="):
        B.lowrank(bias, 16, 16)
    ex = B.lowrank(B.Alibi(torch.ones(2)), 5, 5, mask=M.Causal())
    assert ex.exact and ex.rel_error == 0.0 and ex.rank == 2


def test_svd_route_through_attention_gradients_reach_the_table():
    q, k, v = _qkv(1, 2, 1, 12, 12, 8, 8)
    table = torch.randn(5 * 7, 2, dtype=F64, requires_grad=True)
    bias = B.RelativePosition.swin(table, (3, 4))
    rep = {}
    out = anyattn.attention(q, k, v, bias=bias, method="lowrank_bias", tol=1e-12, report=rep)
    assert rep["bias_rel_error"] < 1e-12 and not rep["exact"]
    ref = anyattn.attention(q, k, v, bias=bias, method="reference")
    torch.testing.assert_close(out, ref)
    (gt,) = torch.autograd.grad(out.sum(), table)
    (rt,) = torch.autograd.grad(ref.sum(), table)
    torch.testing.assert_close(gt, rt)
    # A truncated rank: the output error follows the reported bias error.
    out4 = anyattn.attention(q, k, v, bias=bias, method="lowrank_bias", rank=4, report=rep)
    assert rep["rank"] == 4 and 0 < rep["bias_rel_error"] < 1
    assert (out4 - ref).abs().max() > 0


def test_randomized_svd_path(monkeypatch):
    monkeypatch.setattr(B, "SVD_EXACT_MAX", 8)
    n = 96
    x = torch.linspace(-1, 1, n, dtype=F64)
    smooth = torch.exp(-(x.view(-1, 1) - x.view(1, -1)).square() * 3).unsqueeze(0)  # fast-decaying spectrum
    for tol in (1e-2, 1e-4):
        lr = B.lowrank(B.Dense(smooth), n, n, tol=tol)
        measured = float((smooth - lr.bias.dense(n, n)[0]).norm() / smooth.norm())
        assert measured <= tol and abs(measured - lr.rel_error) < 1e-10
        exact_rank = int(((torch.linalg.svdvals(smooth[0]).flip(0).square().cumsum(0).flip(0).sqrt()
                           / smooth.norm()) > tol).sum())
        assert lr.rank <= exact_rank + 1


def test_gqa_with_per_head_key_factors():
    q, k, v = _qkv(1, 4, 2, 8, 8, 8, 4)
    u = torch.randn(4, 8, 3, dtype=F64, requires_grad=True)
    w = torch.randn(4, 8, 3, dtype=F64, requires_grad=True)  # per query head on the key side too
    bias = B.Factored(u, w)
    _assert_all_close(_grads("lowrank_bias", q, k, v, M.Causal(), bias),
                      _grads("reference", q, k, v, M.Causal(), bias), 1e-9)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_alibi_long_n_precision(dtype, tol):
    """N = 4096: factors magnitudes reach slope * N; computed in fp32 with centered positions and the
    bias columns first, the error stays at the dtype's level (forward only, kept cheap)."""
    N = 4096
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, N, 16, generator=g).to(dtype) for _ in range(3))
    ref = None
    for slopes in (torch.tensor([0.5]), torch.tensor([0.37])):
        bias = B.Alibi(slopes)
        ref = anyattn.attention(q.double(), k.double(), v.double(), mask=M.Causal(),
                                bias=B.Alibi(slopes.double()), method="reference")
        for method in ("lowrank_bias", "blocked"):
            out = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method=method)
            assert out.dtype == dtype
            err = float((out.double() - ref).abs().max() / ref.abs().max())
            assert err < tol, (method, slopes, err)
    e = anyattn.explain(q, k, v, mask=M.Causal(), bias=B.Alibi(torch.tensor([0.37])))
    assert e.method == ("lowrank_bias" if q.device.type == "cpu" else "flex")
    if dtype == torch.bfloat16 and q.device.type == "cpu":
        assert "computed in float32" in e.reason


def test_errors():
    q, k, v = _qkv(1, 2, 2, 4, 4, 4, 4)
    t5 = B.RelativePosition.t5(torch.randn(8, 2, dtype=F64))
    with pytest.raises(ValueError, match="has no exact low-rank form under mask None; pass rank= or tol="):
        anyattn.attention(q, k, v, bias=t5, method="lowrank_bias")
    with pytest.raises(ValueError, match="lowrank_bias.*no bias to factor"):
        anyattn.attention(q, k, v, method="lowrank_bias")
    for opts, err, msg in (({"rank": 0}, ValueError, "rank must be >= 1, got 0"),
                           ({"tol": 2.0}, ValueError, r"tol must be a number in \[0, 1\), got 2.0"),
                           ({"rank": 1, "tol": 0.1}, ValueError, "not both"),
                           ({"engine": "flash"}, ValueError, "engine must be one of"),
                           ({"report": []}, TypeError, "report must be a dict")):
        with pytest.raises(err, match=msg):
            anyattn.attention(q, k, v, bias=t5, method="lowrank_bias", **opts)
    with pytest.raises(ValueError, match="engine='sdpa' cannot run this request"):
        anyattn.attention(q, k, v, mask=M.SlidingWindow(1), bias=B.Alibi(torch.ones(2, dtype=F64)),
                          method="lowrank_bias", engine="sdpa")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(deadline=None, max_examples=10)
@given(kind=st.sampled_from(["alibi", "spatial", "factored", "sum"]), Hk=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 3]), Nq=st.integers(1, 8), extra=st.integers(0, 5), D=st.sampled_from([3, 8]),
       Dv=st.sampled_from([2, 8]), engine=st.sampled_from(["auto", "blocked"]), causal=st.booleans())
def test_property_exact_routes(kind, Hk, G, Nq, extra, D, Dv, engine, causal):
    H, Nk = Hk * G, Nq + extra
    if kind in ("alibi", "sum"):
        causal = True
    q, k, v = _qkv(2, H, Hk, Nq, Nk, D, Dv)
    g = torch.Generator().manual_seed(Nq * 7 + extra)

    def p(*s):
        return torch.randn(*s, generator=g, dtype=F64).requires_grad_()
    alibi = B.Alibi(p(H).abs())
    spatial = B.SpatialDistance(p(Nk, 2), p(H).abs())
    factored = B.Factored(p(2, 1, Nq, 2), p(H, Nk, 2))
    bias = {"alibi": alibi, "spatial": spatial, "factored": factored, "sum": alibi + spatial + factored}[kind]
    mask = M.Causal() if causal else None
    _assert_all_close(_grads("lowrank_bias", q, k, v, mask, bias, engine=engine),
                      _grads("reference", q, k, v, mask, bias), 1e-9)


def test_alibi_band_route_matches_reference(monkeypatch):
    """Causal ALiBi: heads whose slope makes far keys negligible (mass < exp(-45) in float64) attend a
    window in chunks; others the rank-2 route. Outputs, LSE and all gradients match the reference."""
    import anyattn.softmax.lowrank_bias as LB
    monkeypatch.setattr(LB, "BAND_MIN_N", 64)
    N = 600
    q, k, v = _qkv(2, 4, 2, N, N, 4, 3)
    slopes = torch.tensor([2.0, 0.9, 0.6, 0.01], dtype=F64, requires_grad=True)
    bias = B.Alibi(slopes)
    rep = {}
    got = _grads("lowrank_bias", q, k, v, M.Causal(), bias, report=rep)
    w = rep["alibi_windows"]
    assert w[0] is not None and w[0] < 100 and w[3] is None
    groups, full = LB.band_groups(w, N)
    assert groups and 3 in full
    _assert_all_close(got, _grads("reference", q, k, v, M.Causal(), bias), 1e-9)
    rep2 = {}
    anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method="lowrank_bias", band=False, report=rep2)
    assert "alibi_windows" not in rep2


def test_band_groups_cost_model():
    import anyattn.softmax.lowrank_bias as LB
    groups, full = LB.band_groups([150, 300, 600, 1200, 2400, 5000, None, None], 8192)
    assert sorted([h for hs, _ in groups for h in hs] + full) == list(range(8))
    assert set(full) >= {5, 6, 7} and 0 in groups[0][0]
    assert all(w >= max(([150, 300, 600, 1200, 2400][h] for h in hs)) for hs, w in groups)
    assert LB.band_groups([None, None], 8192) == ([], [0, 1])
