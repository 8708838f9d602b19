"""Bias specifications: every bias type against the float64 reference through `blocked` (in-tile bias),
`sdpa` (materialized bias) and `lowrank_bias` (exact factors), with masks, GQA and N_q != N_k: outputs,
LSE and the gradients of q, k, v and every bias parameter. Plus the T5 bucket function, the planner's
bias choices and the error messages."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
from anyattn import biases as B
from anyattn import masks as M

F64 = torch.float64


def _qkv(Bn, H, Hk, Nq, Nk, D, Dv, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_()
                 for s in ((Bn, H, Nq, D), (Bn, Hk, Nk, D), (Bn, Hk, Nk, Dv)))


def _param(*shape, seed=0, low=0.0, high=1.0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape, generator=g, dtype=F64)).to(dtype).requires_grad_()


def make_bias(kind, Bn, H, Nq, Nk, dtype=F64, seed=0):
    """A bias spec of the given kind for this problem (parameters require grad)."""
    if kind == "alibi":
        return B.Alibi(_param(H, seed=seed, low=0.05, high=1.0, dtype=dtype))
    if kind == "t5_bi":
        return B.RelativePosition.t5(_param(8, H, seed=seed, low=-1, high=1, dtype=dtype), True, max_distance=12)
    if kind == "t5_causal":
        return B.RelativePosition.t5(_param(8, H, seed=seed, low=-1, high=1, dtype=dtype), False, max_distance=12)
    if kind == "swin":
        Wh, Ww = {12: (3, 4), 6: (2, 3), 9: (3, 3), 16: (4, 4)}[Nk]
        return B.RelativePosition.swin(_param((2 * Wh - 1) * (2 * Ww - 1), H, seed=seed, low=-1, high=1,
                                              dtype=dtype), (Wh, Ww))
    if kind == "spatial" and Nq > Nk:
        return B.SpatialDistance(_param(Nq, 3, seed=seed, low=-1, high=1, dtype=dtype),
                                 _param(H, seed=seed + 1, low=0.1, high=1, dtype=dtype),
                                 key_coords=_param(Nk, 3, seed=seed + 2, low=-1, high=1, dtype=dtype))
    if kind == "spatial":
        return B.SpatialDistance(_param(Nk, 3, seed=seed, low=-1, high=1, dtype=dtype),
                                 _param(H, seed=seed + 1, low=0.1, high=1, dtype=dtype))
    if kind == "spatial_kv":
        return B.SpatialDistance(_param(Bn, Nq, 2, seed=seed, low=-1, high=1, dtype=dtype),
                                 _param(1, seed=seed + 1, low=0.1, high=1, dtype=dtype),
                                 key_coords=_param(Nk, 2, seed=seed + 2, low=-1, high=1, dtype=dtype))
    if kind == "dense":
        return B.Dense(_param(H, Nq, Nk, seed=seed, low=-2, high=2, dtype=dtype))
    if kind == "factored":
        return B.Factored(_param(H, Nq, 3, seed=seed, low=-1, high=1, dtype=dtype),
                          _param(Nk, 3, seed=seed + 1, low=-1, high=1, dtype=dtype))
    if kind == "bias_mod":
        return B.BiasMod(lambda b, h, qi, ki, w: w[h] * torch.cos(0.3 * (qi - ki)), (_param(H, seed=seed, dtype=dtype),))
    if kind == "sum":
        return make_bias("alibi", Bn, H, Nq, Nk, dtype, seed) + make_bias("t5_bi", Bn, H, Nq, Nk, dtype, seed + 3)
    raise ValueError(kind)


KINDS = ["alibi", "t5_bi", "t5_causal", "swin", "spatial", "spatial_kv", "dense", "factored", "bias_mod", "sum"]


def run(method, q, k, v, mask, bias, seed=1, **opts):
    """out, lse and gradients of (q, k, v, *bias.tensors()) for fixed random cotangents."""
    for t in (q, k, v, *bias.tensors()):
        t.grad = None
    out, lse = anyattn.attention(q, k, v, mask=mask, bias=bias, method=method, return_lse=True, **opts)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=F64)
    dl = torch.randn(lse.shape, generator=g, dtype=F64)
    fin = torch.isfinite(lse)
    loss = (out.double() * do).sum() + (torch.where(fin, lse.double(), 0.0) * dl).sum()
    params = (q, k, v, *bias.tensors())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out, lse, [torch.zeros_like(p) if g_ is None else g_ for p, g_ in zip(params, grads)]


def compare(method, q, k, v, mask, bias, tol=1e-9, **opts):
    got = run(method, q, k, v, mask, bias, **opts)
    want = run("reference", q, k, v, mask, bias)
    names = ["out", "lse", "dq", "dk", "dv"] + [f"d bias.tensors()[{i}]" for i in range(len(bias.tensors()))]
    flat_got = [got[0], got[1]] + list(got[2])
    flat_want = [want[0], want[1]] + list(want[2])
    for n, a, b in zip(names, flat_got, flat_want):
        a, b = a.detach().double(), b.detach().double()
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), f"{method} {n}: infinities differ"
        scale = max(1.0, float(b[fin].abs().max())) if fin.any() else 1.0
        err = float((a[fin] - b[fin]).abs().max()) if fin.any() else 0.0
        assert err <= tol * scale, f"{method} {n}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


MASKS = {"none": lambda: None, "causal": lambda: M.Causal(), "window": lambda: M.SlidingWindow(3, 1),
         "padding": lambda: M.KeyPadding(torch.tensor([5, 9]))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_name", ["none", "causal", "window"])
def test_blocked_in_tile_bias_matches_reference(kind, mask_name):
    Nq, Nk = (12, 12) if kind == "swin" else (7, 12)
    q, k, v = _qkv(2, 4, 2, Nq, Nk, 8, 5)
    bias = make_bias(kind, 2, 4, Nq, Nk)
    compare("blocked", q, k, v, MASKS[mask_name](), bias, block_q=4, block_k=5)


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_materialized_bias_matches_reference(kind):
    Nq, Nk = (9, 9) if kind == "swin" else (9, 9)
    if kind == "swin":
        Nq = Nk = 9
    q, k, v = _qkv(2, 4, 4, Nq, Nk, 8, 8)
    bias = make_bias(kind, 2, 4, Nq, Nk)
    for t in (q, k, v, *bias.tensors()):
        t.grad = None
    out = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method="sdpa")
    (out * torch.cos(out)).sum().backward()
    got = [out.detach()] + [t.grad.clone() for t in (q, k, v, *bias.tensors())]
    for t in (q, k, v, *bias.tensors()):
        t.grad = None
    ref = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method="reference")
    (ref * torch.cos(ref)).sum().backward()
    want = [ref.detach()] + [t.grad.clone() for t in (q, k, v, *bias.tensors())]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["alibi", "spatial", "spatial_kv", "factored"])
@pytest.mark.parametrize("engine", ["sdpa", "blocked"])
def test_lowrank_exact_factors_match_reference(kind, engine):
    q, k, v = _qkv(2, 4, 2, 7, 12, 8, 5)
    compare("lowrank_bias", q, k, v, M.Causal(), make_bias(kind, 2, 4, 7, 12), engine=engine)


def test_every_bias_parameter_gets_a_gradient():
    q, k, v = _qkv(1, 2, 2, 6, 6, 4, 4)
    bias = sum((make_bias(kind, 1, 2, 6, 6, seed=i) for i, kind in
                enumerate(["alibi", "t5_bi", "spatial", "dense", "factored", "bias_mod"])), 0)
    bias = bias if isinstance(bias, B.Bias) else B.as_bias(bias)
    compare("blocked", q, k, v, M.Causal(), bias, block_q=2, block_k=4)
    _, _, grads = run("blocked", q, k, v, M.Causal(), bias, block_q=2, block_k=4)
    for g in grads[3:]:
        assert g.abs().sum() > 0


def test_float32_in_tile_and_lowrank_close_to_float64():
    q, k, v = _qkv(1, 4, 4, 33, 33, 16, 16)
    bias = make_bias("alibi", 1, 4, 33, 33)
    ref = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method="reference")
    q32, k32, v32 = (x.detach().float() for x in (q, k, v))
    b32 = B.Alibi(bias.slopes.detach().float())
    for method in ("blocked", "lowrank_bias", "sdpa"):
        out = anyattn.attention(q32, k32, v32, mask=M.Causal(), bias=b32, method=method)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref.detach(), rtol=2e-5, atol=2e-5)


@settings(deadline=None, max_examples=12)
@given(kind=st.sampled_from([k_ for k_ in KINDS if k_ != "swin"]), Hk=st.sampled_from([1, 2]),
       G=st.sampled_from([1, 2]), Nq=st.integers(1, 9), Nk=st.integers(1, 12),
       mask_name=st.sampled_from(["none", "causal", "window"]), bq=st.integers(1, 5), bk=st.integers(1, 6))
def test_property_blocked_bias(kind, Hk, G, Nq, Nk, mask_name, bq, bk):
    H = Hk * G
    q, k, v = _qkv(2, H, Hk, Nq, Nk, 4, 3)
    bias = make_bias(kind, 2, H, Nq, Nk)
    compare("blocked", q, k, v, MASKS[mask_name](), bias, block_q=bq, block_k=bk)


def _alibi_dense(slopes, n_q, n_k):
    i = torch.arange(n_q).view(-1, 1) + n_k - n_q
    j = torch.arange(n_k).view(1, -1)
    return -slopes.view(-1, 1, 1) * (i - j).abs()


def test_alibi_definition_and_geometric_slopes():
    s = torch.tensor([0.5, 0.25], dtype=F64)
    torch.testing.assert_close(B.Alibi(s).dense(3, 5)[0], _alibi_dense(s, 3, 5))
    g = B.Alibi.geometric(8).slopes
    torch.testing.assert_close(g, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))


def _t5_oracle(rel, bidirectional, num_buckets, max_distance):
    """T5's bucket for one relative position (key minus query), written from the paper's description."""
    ret = 0
    n = -rel
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_the_t5_function(bidirectional):
    rel = torch.arange(-300, 300)
    got = B.t5_bucket(rel, bidirectional, 32, 128)
    want = torch.tensor([_t5_oracle(int(r), bidirectional, 32, 128) for r in rel])
    assert torch.equal(got, want)
    table = torch.randn(32, 2, dtype=F64)
    dense = B.RelativePosition.t5(table, bidirectional, 128).dense(5, 9)
    i = torch.arange(5).view(-1, 1) + 4
    j = torch.arange(9).view(1, -1)
    torch.testing.assert_close(dense[0], table[B.t5_bucket(j - i, bidirectional, 32, 128)].permute(2, 0, 1))


def test_swin_index_matches_swin_relative_position_index():
    Wh, Ww = 3, 4
    coords = torch.stack(torch.meshgrid(torch.arange(Wh), torch.arange(Ww), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += Wh - 1
    rel[:, :, 1] += Ww - 1
    index = rel[:, :, 0] * (2 * Ww - 1) + rel[:, :, 1]  # Swin's relative_position_index
    table = torch.randn((2 * Wh - 1) * (2 * Ww - 1), 3, dtype=F64)
    dense = B.RelativePosition.swin(table, (Wh, Ww)).dense(12, 12)
    torch.testing.assert_close(dense[0], table[index].permute(2, 0, 1))


def test_spatial_distance_definition():
    x = torch.randn(2, 5, 3, dtype=F64)
    y = torch.randn(7, 3, dtype=F64)
    w = torch.tensor([0.5, 2.0], dtype=F64)
    d = B.SpatialDistance(x, w, key_coords=y).dense(5, 7)
    want = -w.view(1, 2, 1, 1) * torch.cdist(x, y.unsqueeze(0)).square().unsqueeze(1)
    torch.testing.assert_close(d, want)


def test_bias_mod_callable_and_tensor_normalization():
    assert isinstance(B.as_bias(lambda b, h, q, k: (q - k).double()), B.BiasMod)
    assert isinstance(B.as_bias(torch.zeros(3, 3)), B.Dense)
    q, k, v = _qkv(1, 2, 2, 5, 5, 4, 4)
    out = anyattn.attention(q, k, v, bias=lambda b, h, qi, ki: -0.1 * (qi - ki).abs().double(), method="blocked")
    ref = anyattn.attention(q, k, v, bias=B.Alibi(torch.full((1,), 0.1, dtype=F64)), method="reference")
    torch.testing.assert_close(out, ref)


# --- planner ---------------------------------------------------------------------------------------

def _explain(q, k, v, mask, bias, **kw):
    return anyattn.explain(q, k, v, mask=mask, bias=bias, **kw)


@pytest.mark.cpu_only  # auto's CPU choices (CUDA prefers flex)
def test_auto_takes_lowrank_for_causal_alibi_and_in_tile_for_symmetric():
    q, k, v = (torch.randn(1, 4, 4096, 16) for _ in range(3))
    alibi = B.Alibi.geometric(4)
    e = _explain(q, k, v, M.Causal(), alibi)
    assert e.method == "lowrank_bias" and "rank 2" in e.reason
    e = _explain(q, k, v, None, alibi)
    assert e.method == "blocked" and "no exact low-rank form" in e.reason and "MiB" in e.reason
    small = [x[:, :, :64] for x in (q, k, v)]
    assert _explain(*small, None, alibi).method == "sdpa"
    assert _explain(*small, M.SlidingWindow(8), alibi).method == "lowrank_bias"
    assert _explain(*small, M.SlidingWindow(8, 8), alibi).method == "blocked"


@pytest.mark.cpu_only  # auto's CPU choices (CUDA prefers flex)
def test_auto_dense_bias_spatial_and_svd_note():
    q, k, v = (torch.randn(1, 2, 128, 16) for _ in range(3))
    assert _explain(q, k, v, M.Causal(), torch.randn(1, 2, 128, 128)).method == "sdpa"
    sp = B.SpatialDistance(torch.randn(128, 3), torch.ones(2))
    assert _explain(q, k, v, None, sp).method == "lowrank_bias"
    lr = B.lowrank(B.RelativePosition.swin(torch.randn(15 * 31, 2), (8, 16)), 128, 128, rank=4)
    e = _explain(q, k, v, None, lr.bias)
    assert e.method == "lowrank_bias" and "truncated SVD of rank 4" in e.reason
    # return_lse with a bias that needs gradients: the CPU flash op gives no attn_mask gradient.
    dense = torch.randn(1, 2, 128, 128, requires_grad=True)
    assert _explain(q, k, v, None, dense, return_lse=True).method == "blocked"


@pytest.mark.cpu_only  # auto's CPU choices (CUDA prefers flex)
def test_auto_in_tile_where_alibi_factors_lose_precision():
    slopes = torch.tensor([0.3, 0.7])  # not short in binary: hi/lo split
    a = B.Alibi(slopes)
    assert a.exact_rank(M.Causal(), 8, 8) == 4
    assert a.factor_error(8192) < 1e-5
    assert a.factor_error(1 << 21) > 1e-5
    assert B.Alibi.geometric(8).factor_error(1 << 21) == 0.0
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 1 << 21, 8)
    assert _explain(q, k, k, M.Causal(), a).method == "blocked"


def test_auto_runs_and_matches_reference():
    q, k, v = _qkv(1, 4, 2, 40, 40, 8, 8)
    for bias in (B.Alibi.geometric(4, dtype=F64), make_bias("spatial", 1, 4, 40, 40), make_bias("t5_bi", 1, 4, 40, 40)):
        out = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias)
        ref = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method="reference")
        torch.testing.assert_close(out, ref)


# --- errors ----------------------------------------------------------------------------------------

def _call(bias, mask=None, H=2, N=6):
    q, k, v = (torch.randn(1, H, N, 4) for _ in range(3))
    return anyattn.attention(q, k, v, bias=bias, mask=mask, method="blocked")


@pytest.mark.parametrize("make, err, msg", [
    (lambda: B.Alibi(torch.ones(3)), ValueError, r"Alibi slopes must have shape \(H,\) = \(2,\), got \(3,\)"),
    (lambda: B.Alibi(torch.ones(2, 1)), ValueError, "Alibi slopes must have 1 dimensions"),
    (lambda: B.Alibi(torch.ones(2, dtype=torch.long)), TypeError, "Alibi slopes must be a floating tensor"),
    (lambda: B.Alibi(torch.tensor([1.0, float("nan")])), ValueError, "Alibi slopes contains NaN"),
    (lambda: B.Alibi(torch.ones(2, device="meta")), ValueError, "Alibi slopes must be on the inputs' device cpu, got meta"),
    (lambda: B.RelativePosition.t5(torch.ones(8, 3)), ValueError, r"shape \(num_entries, H\) with H = 2, got \(8, 3\)"),
    (lambda: B.RelativePosition.t5(torch.ones(2, 2)), ValueError, "at least 4 buckets"),
    (lambda: B.RelativePosition.t5(torch.ones(8, 2), max_distance=1), ValueError, "max_distance must be an int >"),
    (lambda: B.RelativePosition.swin(torch.ones(10, 2), (2, 3)), ValueError, r"must have \(2\*2-1\)\*\(2\*3-1\) = 15 rows, got 10"),
    (lambda: B.RelativePosition.swin(torch.ones(9, 2), (2, 2)), ValueError, "Swin grid .* needs N_k = 4 keys"),
    (lambda: B.RelativePosition.swin(torch.ones(9, 2), (2,)), ValueError, "grid must be a pair of ints"),
    (lambda: B.SpatialDistance(torch.ones(5, 3), torch.ones(2)), ValueError,
     r"SpatialDistance coords must have shape \(N, d\) or \(B, N, d\) with N = 6"),
    (lambda: B.SpatialDistance(torch.ones(6), torch.ones(2)), ValueError, r"coords must have shape \(N, d\)"),
    (lambda: B.SpatialDistance(torch.ones(6, 3), torch.ones(2), key_coords=torch.ones(6, 2)), ValueError,
     "key_coords must have coords' dimension d = 3, got 2"),
    (lambda: B.SpatialDistance(torch.full((6, 3), float("nan")), torch.ones(2)), ValueError, "coords contains NaN"),
    (lambda: B.Factored(torch.ones(6, 2), torch.ones(6, 3)), ValueError, "same rank"),
    (lambda: B.Factored(torch.ones(5, 2), torch.ones(6, 2)), ValueError, r"Factored u of shape \(1, 1, 5, 2\) does not broadcast"),
    (lambda: B.Dense(torch.ones(2, 6, 5)), ValueError, "bias of shape .* does not broadcast"),
    (lambda: B.Dense(torch.full((6, 6), float("nan"))), ValueError, "bias contains NaN"),
    (lambda: B.Dense(torch.ones(6, 6, device="meta")), ValueError, "bias must be on the inputs' device"),
    (lambda: 3, TypeError, "bias must be None, an anyattn.biases spec, a float tensor or a bias_mod callable, got int"),
    (lambda: B.BiasMod(lambda b, h, q, k: q - k), TypeError, "bias_mod must return a float tensor, got torch.int64"),
])
def test_bad_biases_raise_clear_errors(make, err, msg):
    with pytest.raises(err, match=msg):
        _call(make())


def test_bias_mod_closing_over_grad_tensors_is_rejected():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="closes over tensors that require grad; pass them as BiasMod"):
        _call(B.BiasMod(lambda b, h, q, k: w[h] * (q - k).float()))


def test_spatial_distance_without_key_coords_needs_nq_le_nk():
    q = torch.randn(1, 2, 6, 4)
    k = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="SpatialDistance without key_coords needs N_q <= N_k .* got N_q = 6, N_k = 4"):
        anyattn.attention(q, k, k, bias=B.SpatialDistance(torch.ones(4, 3), torch.ones(2)))


def test_sdpa_with_lse_refuses_a_bias_that_needs_gradients():
    import pytest
    import anyattn
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    bias = torch.randn(1, 2, 8, 8, requires_grad=True)
    with pytest.raises(ValueError, match="returns no gradient for the bias"):
        anyattn.attention(q, k, v, bias=bias, method="sdpa", return_lse=True)
    out, lse = anyattn.attention(q, k, v, bias=bias, return_lse=True)  # auto takes a route with bias grads
    (out.sum() + lse.sum()).backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
