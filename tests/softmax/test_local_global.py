"""Local + global attention and grid orders (issue 16): `anyattn.local_global_attention` against the
dense reference with the equivalent mask built here from the definition (float64, outputs and gradients
of all six inputs), the space-filling-curve orders, and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import anyattn
from anyattn.grid_order import grid_order
from anyattn.softmax.local_global import local_global_attention, local_global_mask


def _inputs(B, H, Hk, N, M, D, Dv, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return r(B, H, N, D), r(B, Hk, N, D), r(B, Hk, N, Dv), r(B, H, M, D), r(B, Hk, M, D), r(B, Hk, M, Dv)


def _nc(x):
    """The same values stored as (B, N, H, D): a non-contiguous (B, H, N, D) view."""
    return x.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()


def _definition_mask(grid, window, M):
    """Token i (row-major) sees token j iff both lie in the same aligned block; everyone sees the globals;
    globals see only globals."""
    Hg, Wg = grid
    wh, ww = (window, window) if isinstance(window, int) else window
    N = Hg * Wg
    m = torch.zeros(N + M, N + M, dtype=torch.bool)
    for i in range(N):
        for j in range(N):
            m[i, j] = (i // Wg) // wh == (j // Wg) // wh and (i % Wg) // ww == (j % Wg) // ww
    m[:, N:] = True
    return m


def _reference(xs, grid, window, M):
    q, k, v, qg, kg, vg = xs
    mask = _definition_mask(grid, window, M)
    N = q.shape[2]
    out = anyattn.attention(torch.cat([q, qg], 2), torch.cat([k, kg], 2), torch.cat([v, vg], 2), mask=mask,
                            method="reference")
    return out[:, :, :N], out[:, :, N:]


def _grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("grid,window,M,G", [((8, 8), 4, 3, 1), ((6, 7), 4, 2, 2), ((4, 6), (2, 3), 5, 1),
                                             ((3, 3), 5, 1, 1)])
def test_matches_dense_reference_outputs_and_gradients(grid, window, M, G):
    xs = _inputs(2, 2 * G, 2, grid[0] * grid[1], M, 5, 3)
    got = local_global_attention(*xs, grid=grid, window=window)
    ref = _reference(xs, grid, window, M)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(got, xs), _grads(ref, xs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert torch.equal(local_global_mask(grid, window, M), _definition_mask(grid, window, M))


@settings(max_examples=15, deadline=None)
@given(Hg=st.integers(1, 7), Wg=st.integers(1, 7), wh=st.integers(1, 4), ww=st.integers(1, 4),
       M=st.integers(1, 4), G=st.integers(1, 2), D=st.integers(1, 4), contiguous=st.booleans())
def test_property_shapes(Hg, Wg, wh, ww, M, G, D, contiguous):
    xs = _inputs(1, 2 * G, 2, Hg * Wg, M, D, 2)
    if not contiguous:
        xs = tuple(_nc(x) for x in xs)
    got = local_global_attention(*xs, grid=(Hg, Wg), window=(wh, ww))
    for a, b in zip(got, _reference(xs, (Hg, Wg), (wh, ww), M)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["morton", "hilbert"])
def test_curve_order_inputs_give_the_same_attention(kind):
    grid, w = (8, 16), 4
    xs = _inputs(1, 2, 1, 128, 3, 4, 4)
    perm, inv = grid_order(*grid, kind)
    ref, ref_g = local_global_attention(*xs, grid=grid, window=w)
    q, k, v = (x[:, :, perm] for x in xs[:3])
    out, out_g = local_global_attention(q, k, v, *xs[3:], grid=grid, window=w, order=kind)
    torch.testing.assert_close(out[:, :, inv], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_g, ref_g)


@pytest.mark.parametrize("kind", ["morton", "hilbert"])
@pytest.mark.parametrize("H,W", [(8, 8), (4, 16), (12, 8), (5, 3)])
def test_grid_order_is_a_permutation_with_contiguous_aligned_blocks(kind, H, W):
    perm, inv = grid_order(H, W, kind)
    assert torch.equal(torch.sort(perm).values, torch.arange(H * W))
    assert torch.equal(perm[inv], torch.arange(H * W))
    pos = torch.empty(H * W, dtype=torch.long)
    pos[perm] = torch.arange(H * W)                   # curve position of each row-major cell
    for w in (1, 2, 4):
        for r0 in range(0, H - w + 1, w):
            for c0 in range(0, W - w + 1, w):
                cells = torch.tensor([(r0 + a) * W + c0 + b for a in range(w) for b in range(w)])
                p = pos[cells]
                assert int(p.max() - p.min()) == w * w - 1, (kind, w, r0, c0)


def test_morton_known_order_and_hilbert_adjacency():
    perm, _ = grid_order(4, 4, "morton")          # Z-order: (0,0) (0,1) (1,0) (1,1) (0,2) (0,3) (1,2) (1,3) ...
    assert perm[:8].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    for n in (2, 4, 8, 16):
        perm, _ = grid_order(n, n, "hilbert")
        r, c = perm // n, perm % n
        steps = (r[1:] - r[:-1]).abs() + (c[1:] - c[:-1]).abs()
        assert bool((steps == 1).all()), n        # consecutive Hilbert cells are grid neighbours


def test_float32_and_validation():
    xs = _inputs(1, 2, 2, 16, 2, 4, 4)
    out, _ = local_global_attention(*(x.float() for x in xs), grid=(4, 4), window=2)
    ref, _ = _reference(xs, (4, 4), 2, 2)
    torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="grid"):
        local_global_attention(*xs, grid=(4, 5), window=2)
    with pytest.raises(ValueError, match="window"):
        local_global_attention(*xs, grid=(4, 4), window=0)
    with pytest.raises(ValueError, match="power-of-two"):
        local_global_attention(*xs, grid=(4, 4), window=3, order="morton")
    with pytest.raises(ValueError, match="order"):
        local_global_attention(*xs, grid=(4, 4), window=2, order="snake")
    with pytest.raises(ValueError, match="global tokens"):
        local_global_attention(*xs[:3], xs[3][..., :3], xs[4][..., :3], xs[5], grid=(4, 4), window=2)
    with pytest.raises(ValueError, match="kind"):
        grid_order(4, 4, "peano")
    with pytest.raises(ValueError, match="H"):
        grid_order(0, 4)


def test_blocked_route_where_sdpa_has_no_lse(monkeypatch):
    import anyattn.softmax.lse_attention as la
    xs = _inputs(1, 2, 1, 30, 2, 4, 3)
    ref = _reference(xs, (5, 6), 4, 2)
    monkeypatch.setattr(la, "lse_supported", lambda device, dtype=None: False)
    got = local_global_attention(*xs, grid=(5, 6), window=4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(_grads(got, xs), _grads(ref, xs)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
