"""Neighborhood attention (issue 4): the engine and the mask spec against a brute-force dense mask built
here from the plain per-query definition (METHODS.md "Neighborhood attention"), outputs, LSE and
gradients; NATTEN's forward when installed; validation messages."""
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anyattn
from anyattn.masks.neighborhood import Neighborhood
from anyattn.softmax.neighborhood import default_tiles, neighborhood


# ---------------------------------------------------------------- the oracle (independent index math)
def _axis_allowed(x, y, n, k, d, s, causal):
    if x % d != y % d:
        return False
    g = x % d
    ng = len(range(g, n, d))  # points of this dilation group
    cx, cy = x // d, y // d
    if causal:
        leader = min((cx // s) * s + s - 1, ng - 1)
        return cy <= cx and leader - cy < k
    left, right = k // 2, k // 2 + k % 2 - 1
    leader = min((cx // s) * s + s // 2, ng - 1)
    center = min(max(leader, left), ng - 1 - right)
    return center - left <= cy <= center + right


def brute_mask(shape, ks, ds, ss, cs):
    """(N, N) bool: query i (row-major grid point) may attend key j."""
    coords = list(itertools.product(*[range(n) for n in shape]))
    N = len(coords)
    per_axis = []
    for a, (n, k, d, s, c) in enumerate(zip(shape, ks, ds, ss, cs)):
        tab = torch.tensor([[_axis_allowed(x, y, n, k, d, s, c) for y in range(n)] for x in range(n)])
        per_axis.append(tab)
    idx = torch.tensor(coords).view(N, len(shape))
    m = torch.ones(N, N, dtype=torch.bool)
    for a, tab in enumerate(per_axis):
        m &= tab[idx[:, a].view(-1, 1), idx[:, a].view(1, -1)]
    return m


def _tup(v, m):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * m


def reference(q, k, v, shape, ks, ds=1, ss=1, cs=False, add=None, return_lse=False):
    m = len(shape)
    M = brute_mask(shape, _tup(ks, m), _tup(ds, m), _tup(ss, m), _tup(cs, m))
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    N = math.prod(shape)
    kf, vf = k.reshape(B, k.shape[1], N, D), v.reshape(B, v.shape[1], N, v.shape[-1])
    if add is not None:
        kf, vf = torch.cat([kf, add[0]], 2), torch.cat([vf, add[1]], 2)
        M = torch.cat([M, torch.ones(N, add[0].shape[2], dtype=torch.bool)], 1)
    out, lse = anyattn.attention(q.reshape(B, H, N, D), kf, vf, mask=M, method="reference", return_lse=True)
    out = out.reshape(B, H, *shape, v.shape[-1])
    return (out, lse.reshape(B, H, *shape)) if return_lse else out


def _qkv(B, H, shape, D, H_kv=None, D_v=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    H_kv, D_v = H_kv or H, D_v or D
    q = torch.randn(B, H, *shape, D, generator=g, dtype=dtype)
    k = torch.randn(B, H_kv, *shape, D, generator=g, dtype=dtype)
    v = torch.randn(B, H_kv, *shape, D_v, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v)]


def _grads(out, ts, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), ts)


def _assert_close_with_grads(fn, ref_fn, ts, atol=1e-10, rtol=1e-9):
    out, ref = fn(), ref_fn()
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for a, b in zip(_grads(out, ts), _grads(ref, ts)):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ---------------------------------------------------------------- semantics, named cases
def test_borders_shift_windows_not_shrink():
    # METHODS.md: L=20, k=5: query 0 sees 0..4, query 19 sees 15..19, query 10 sees 8..12.
    M = Neighborhood(20, 5).dense(1, 1, 20, 20, "cpu")[0, 0]
    assert M[0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert M[19].nonzero().flatten().tolist() == [15, 16, 17, 18, 19]
    assert M[10].nonzero().flatten().tolist() == [8, 9, 10, 11, 12]
    assert (M.sum(1) == 5).all()
    assert torch.equal(M, brute_mask((20,), (5,), (1,), (1,), (False,)))


def test_even_kernel_and_causal_and_stride():
    M = Neighborhood(10, 4).dense(1, 1, 10, 10, "cpu")[0, 0]
    assert M[5].nonzero().flatten().tolist() == [3, 4, 5, 6]  # 2 left, self, 1 right
    C = Neighborhood(10, 3, is_causal=True).dense(1, 1, 10, 10, "cpu")[0, 0]
    assert C[0].nonzero().flatten().tolist() == [0]  # no shifting when causal
    assert C[5].nonzero().flatten().tolist() == [3, 4, 5]
    S = Neighborhood(12, 4, stride=4).dense(1, 1, 12, 12, "cpu")[0, 0]  # Swin-style blocks
    for i in range(12):
        assert S[i].nonzero().flatten().tolist() == list(range(4 * (i // 4), 4 * (i // 4) + 4))
    Dm = Neighborhood(11, 3, dilation=3).dense(1, 1, 11, 11, "cpu")[0, 0]
    assert Dm[0].nonzero().flatten().tolist() == [0, 3, 6]
    assert Dm[10].nonzero().flatten().tolist() == [4, 7, 10]  # group 1 has 4 points: 1, 4, 7, 10


@pytest.mark.parametrize("shape,ks,ds,ss,cs", [
    ((20,), 5, 1, 1, False),
    ((23,), 4, 2, 3, False),
    ((17,), 6, 2, 4, True),
    ((9, 11), (3, 4), (2, 1), (2, 3), (False, True)),
    ((12, 10), (5, 5), 1, (5, 1), False),
    ((5, 6, 7), (2, 3, 3), (2, 1, 2), (1, 2, 3), (True, False, False)),
])
def test_against_brute_force_outputs_and_grads(shape, ks, ds, ss, cs):
    q, k, v = _qkv(2, 2, shape, 8)
    _assert_close_with_grads(lambda: neighborhood(q, k, v, ks, ds, ss, cs),
                             lambda: reference(q, k, v, shape, ks, ds, ss, cs), [q, k, v])


@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocked"])
@pytest.mark.parametrize("tile", [1, 2, 3, 5])
def test_any_tile_gives_the_same_result(tile, backend):
    q, k, v = _qkv(1, 2, (13, 7), 4)
    ref = reference(q, k, v, (13, 7), (4, 3), (1, 2), (2, 1), (False, True))
    out = neighborhood(q, k, v, (4, 3), (1, 2), (2, 1), (False, True), tile=tile, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)


@st.composite
def _configs(draw):
    m = draw(st.integers(1, 3))
    shape, ks, ds, ss, cs = [], [], [], [], []
    for _ in range(m):
        n = draw(st.integers(2, {1: 40, 2: 9, 3: 5}[m]))
        d = draw(st.integers(1, max(1, n // 2)))
        k = draw(st.integers(1, n // d))
        s = draw(st.integers(1, k))
        shape.append(n), ks.append(k), ds.append(d), ss.append(s), cs.append(draw(st.booleans()))
    return tuple(shape), tuple(ks), tuple(ds), tuple(ss), tuple(cs)


@settings(deadline=None, max_examples=20)
@given(_configs(), st.integers(0, 2 ** 16))
def test_property_random_configs(cfg, seed):
    shape, ks, ds, ss, cs = cfg
    q, k, v = _qkv(1, 2, shape, 4, seed=seed)
    _assert_close_with_grads(lambda: neighborhood(q, k, v, ks, ds, ss, cs),
                             lambda: reference(q, k, v, shape, ks, ds, ss, cs), [q, k, v])


@pytest.mark.parametrize("backend", ["auto", "sdpa", "blocked"])
def test_lse_additional_kv_gqa_dv(backend):
    shape, ks, ds, ss, cs = (7, 9), (3, 4), (2, 2), (2, 3), (True, False)
    q, k, v = _qkv(2, 4, shape, 8, H_kv=2, D_v=6)
    g = torch.Generator().manual_seed(3)
    ak = torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    av = torch.randn(2, 2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    out, lse = neighborhood(q, k, v, ks, ds, ss, cs, additional_k=ak, additional_v=av, return_lse=True,
                            backend=backend)
    ro, rl = reference(q, k, v, shape, ks, ds, ss, cs, add=(ak, av), return_lse=True)
    torch.testing.assert_close(out, ro, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, rl, atol=1e-10, rtol=1e-9)
    ts = [q, k, v, ak, av]
    gl = torch.randn(rl.shape, generator=g, dtype=rl.dtype)
    a = torch.autograd.grad((out * 1.5).sum() + (lse * gl).sum(), ts)
    b = torch.autograd.grad((ro * 1.5).sum() + (rl * gl).sum(), ts)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-10, rtol=1e-9)


def test_float32_and_bfloat16():
    q, k, v = _qkv(1, 2, (6, 8, 5), 16, dtype=torch.float32)
    ref = reference(q.double(), k.double(), v.double(), (6, 8, 5), (3, 5, 2), 1, (1, 2, 1), (False, False, True))
    out = neighborhood(q, k, v, (3, 5, 2), 1, (1, 2, 1), (False, False, True))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)
    for a, b in zip(_grads(out, [q, k, v]), _grads(ref.float(), [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    ob = neighborhood(qb, kb, vb, (3, 5, 2), 1, (1, 2, 1), (False, False, True))
    assert ob.dtype == torch.bfloat16
    assert (ob.double() - ref).abs().max() < 5e-2


def test_long_sequence_memory_is_linear():
    # N = 2**17 tokens: a dense (N, N) mask alone would be 16 GiB; forward+backward must run in O(N).
    q, k, v = _qkv(1, 1, (2 ** 17,), 4, dtype=torch.float32)
    out = neighborhood(q, k, v, 7)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.shape == q.shape
    q2, k2, v2 = _qkv(1, 1, (512, 256), 4, dtype=torch.float32)
    neighborhood(q2, k2, v2, (3, 5), dilation=(2, 1)).sum().backward()
    assert torch.isfinite(k2.grad).all()


def test_default_tiles_are_stride_multiples():
    for shape, k, d, s in [((100,), (9,), (1,), (3,)), ((30, 20), (5, 4), (2, 1), (5, 2)),
                           ((16, 32, 32), (3, 7, 7), (1, 1, 1), (1, 1, 1))]:
        tiles = default_tiles(shape, k, d, s)
        assert len(tiles) == len(shape)
        for T, n, dd, ss in zip(tiles, shape, d, s):
            assert T % ss == 0 or T >= -(-n // dd)


# ---------------------------------------------------------------- the mask spec
@pytest.mark.parametrize("shape,ks,ds,ss,cs", [
    ((37,), 6, 2, 3, False), ((40,), 9, 1, 2, True), ((30,), 7, 1, 1, False),
    ((6, 7), (3, 4), (2, 1), (1, 2), (False, True)), ((3, 4, 5), (2, 3, 3), (1, 1, 1), (1, 1, 3), (False, True, False)),
])
def test_mask_spec_dense_and_blocked(shape, ks, ds, ss, cs):
    spec = Neighborhood(shape, ks, ds, ss, cs)
    N = math.prod(shape)
    M = brute_mask(shape, spec.kernel_size, spec.dilation, spec.stride, spec.is_causal)
    assert torch.equal(spec.dense(1, 1, N, N, "cpu")[0, 0], M.cpu())
    # tile ranges: conservative and tight; full ranges really full
    for bq in (1, 4, 7):
        for t, span in enumerate(spec.tile_ranges(N, N, bq)):
            rows = M[t * bq:(t + 1) * bq]
            cols = rows.any(0).nonzero().flatten()
            assert span.lo == int(cols.min()) and span.hi == int(cols.max()) + 1
            if span.full_hi > span.full_lo:
                assert rows[:, span.full_lo:span.full_hi].all()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    _assert_close_with_grads(
        lambda: anyattn.attention(q, k, v, mask=spec, method="blocked", block_q=5, block_k=8),
        lambda: anyattn.attention(q, k, v, mask=M, method="reference"), [q, k, v])


def test_mask_spec_validates_lengths():
    spec = Neighborhood((4, 5), 3)
    q = torch.randn(1, 1, 21, 4)
    with pytest.raises(ValueError, match=r"N_q = N_k = prod\(shape\) = 20"):
        anyattn.attention(q, q, q, mask=spec, method="blocked")
    with pytest.raises(ValueError, match="shape must be"):
        Neighborhood((4, 0), 3)


# ---------------------------------------------------------------- NATTEN's forward
def _natten():
    try:
        import natten as nt
        return nt
    except Exception:  # noqa: BLE001
        return None


@pytest.mark.parametrize("shape,ks,ds,ss,cs", [
    ((23,), 4, 2, 3, False),
    ((9, 11), (3, 4), (2, 1), (2, 3), (False, True)),
    ((5, 6, 7), (2, 3, 3), (2, 1, 2), (1, 2, 3), (True, False, False)),
])
def test_against_natten_forward(shape, ks, ds, ss, cs):
    nt = _natten()
    if nt is None:
        pytest.skip("natten not installed (the bench extra installs it)")
    import warnings
    q, k, v = (t.detach().float() for t in _qkv(2, 2, shape, 8))
    fn = {1: nt.na1d, 2: nt.na2d, 3: nt.na3d}[len(shape)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fn(q.movedim(1, -2), k.movedim(1, -2), v.movedim(1, -2), kernel_size=ks, dilation=ds, stride=ss,
                 is_causal=cs).movedim(-2, 1)
    out = neighborhood(q, k, v, ks, ds, ss, cs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- validation messages
def test_validation_messages():
    q = torch.randn(1, 2, 10, 12, 4)
    with pytest.raises(ValueError, match=r"kernel_size \* dilation.*axis 1.*kernel_size=5 \* dilation=3 = 15 > size 12"):
        neighborhood(q, q, q, 5, dilation=(1, 3))
    with pytest.raises(ValueError, match=r"stride must be <= kernel_size.*stride=4 > kernel_size=3"):
        neighborhood(q, q, q, 3, stride=4)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a sequence of 2 ints"):
        neighborhood(q, q, q, (3, 3, 3))
    with pytest.raises(TypeError, match="kernel_size must be an int"):
        neighborhood(q, q, q, 3.0)
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        neighborhood(q, q, q, 3, is_causal=1)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        neighborhood(q, q, q, 3, dilation=0)
    with pytest.raises(ValueError, match=r"q must have shape \(B, H, \*spatial, D\)"):
        neighborhood(q[0, 0], q[0, 0], q[0, 0], 3)
    with pytest.raises(ValueError, match=r"k and v must have q's spatial shape \(10, 12\), got k: \(10, 11\)"):
        neighborhood(q, q[..., :11, :], q, 3)
    with pytest.raises(ValueError, match=r"multiple of k's heads"):
        neighborhood(q, torch.randn(1, 3, 10, 12, 4), torch.randn(1, 3, 10, 12, 4), 3)
    with pytest.raises(ValueError, match="additional_k and additional_v must be given together"):
        neighborhood(q, q, q, 3, additional_k=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"additional_k must have shape \(B, H_kv, N_add, D\)"):
        neighborhood(q, q, q, 3, additional_k=torch.randn(1, 2, 3, 5), additional_v=torch.randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        neighborhood(q, q, q, 3, backend="cuda")
    with pytest.raises(ValueError, match="tile must be a positive int"):
        neighborhood(q, q, q, 3, tile=(0, 2))
    with pytest.raises(ValueError, match="k must have q's dtype"):
        neighborhood(q, q.double(), q, 3)


def test_attention_method_neighborhood():
    spec = Neighborhood((6, 7), (3, 4), (2, 1), (1, 2), (False, True))
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, 42, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 42, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out, lse = anyattn.attention(q, k, v, mask=spec, method="neighborhood", return_lse=True)
    ref, rlse = anyattn.attention(q, k, v, mask=spec, method="reference", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(lse, rlse, atol=1e-10, rtol=1e-9)
    for a, b in zip(_grads(out, [q, k, v]), _grads(ref, [q, k, v])):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    with pytest.raises(ValueError, match="not a masks.Neighborhood spec"):
        anyattn.attention(q, k, v, mask=anyattn.masks.Causal(), method="neighborhood")
