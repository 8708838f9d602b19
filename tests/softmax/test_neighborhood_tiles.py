"""The neighborhood engine's tiling: halos start per tile (border tiles compute no more keys than inner
ones), 1-D inner halos are views of the keys, every query tile is computed exactly once, and the default
tiles keep the computed area close to the window area. Outputs are checked against the brute-force
oracle in test_neighborhood.py."""
import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from anyattn.masks.neighborhood import normalize_args
from anyattn.softmax.neighborhood import _groups, _key_buffer, _plan, default_tiles


def _plan_of(shape, ks, ds=1, ss=1, cs=False, tiles=None):
    ks, ds, ss, cs = normalize_args(shape, ks, ds, ss, cs)
    tiles = tiles or default_tiles(tuple(shape), ks, ds, ss)
    return _plan(tuple(shape), ks, ds, ss, cs, tuple(tiles), torch.device("cpu"))


def test_border_tiles_have_no_larger_halo():
    # windows shift inward at the borders: a fixed halo offset would need T + k - 1 + k // 2 keys there
    for causal in (False, True):
        p = _plan_of((1000,), 65, tiles=(32,), cs=causal)
        assert p.hk == 32 + 65 - 1
        assert p.axes[0].start.min() >= 0 and (p.axes[0].start + p.hk).max() <= 1000
    p = _plan_of((40, 50), (7, 9), tiles=(8, 16))
    assert p.hk == (8 + 6) * (16 + 8)


def test_inner_halos_are_views_of_the_keys():
    k = torch.randn(2, 3, 500, 8)
    p = _plan_of((500,), 33, tiles=(50,))
    buf = _key_buffer(k, p)
    assert buf.data_ptr() == k.data_ptr()  # no copy in 1-D without dilation
    e0, e1 = p.inner_range[0]
    assert e0 <= 1 and e1 >= p.axes[0].nt - 1  # only the first and last tile are border tiles here


@st.composite
def _configs(draw):
    m = draw(st.integers(1, 3))
    shape, ks, ds, ss, cs, ts = [], [], [], [], [], []
    for _ in range(m):
        n = draw(st.integers(2, {1: 60, 2: 12, 3: 6}[m]))
        d = draw(st.integers(1, max(1, n // 2)))
        k = draw(st.integers(1, n // d))
        s = draw(st.integers(1, k))
        shape.append(n), ks.append(k), ds.append(d), ss.append(s), cs.append(draw(st.booleans()))
        ts.append(draw(st.integers(1, 9)))
    return tuple(shape), tuple(ks), tuple(ds), tuple(ss), tuple(cs), tuple(ts)


@settings(deadline=None, max_examples=40)
@given(_configs(), st.sampled_from([1, 2]), st.sampled_from([1, 3]))
def test_every_query_tile_is_computed_exactly_once(cfg, G, BH_kv):
    shape, ks, ds, ss, cs, ts = cfg
    p = _plan_of(shape, ks, ds, ss, cs, tiles=ts)
    n_tiles = p.R * p.axes[0].nt
    count = torch.zeros(BH_kv * G * n_tiles, dtype=torch.long)
    for g in _groups(p, BH_kv * G, G, 4, 4, torch.float32):
        count[g.q0:g.q0 + (g.n - 1) * g.q_stride + 1:g.q_stride] += 1
        assert g.mask is None or g.mask.shape[0] in (1, g.n)
    assert bool((count == 1).all())


def test_default_tiles_keep_the_computed_area_near_the_window():
    # 1-D, kernel 257 (the benchmark's): a tile of T queries computes T + 256 keys each, 257 are needed
    (T,) = default_tiles((16384,), (257,), (1,), (1,))
    assert 32 <= T <= 128 and (T + 256) / 257 <= 1.5
    # dilation: tiles are in group coordinates, so the same rule holds per group
    assert default_tiles((16384,), (257,), (4,), (1,)) == (T,)
    for shape, k in (((128, 128), (13, 13)), ((16, 32, 32), (3, 7, 7))):
        tiles = default_tiles(shape, k, (1,) * len(shape), (1,) * len(shape))
        area = math.prod(t + kk - 1 for t, kk in zip(tiles, k)) / math.prod(k)
        old = math.prod(min(8, n) + kk - 1 for n, kk in zip(shape, k)) / math.prod(k)  # 8 per axis
        assert area < old
