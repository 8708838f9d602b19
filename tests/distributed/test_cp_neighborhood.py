"""`ad.neighborhood` (halo exchange) on thread ranks against the single-process engine in float64:
1-D/2-D/3-D, kernel, dilation, stride, causal on every axis, GQA, D_v != D; outputs, LSE, gradients;
the halo error; flattened inputs; halo bytes."""
import pytest
import torch
from hypothesis import assume, given, strategies as st

import anyattn
import anyattn.distributed as ad
from anyattn.distributed.testing import run_threads


def rank_run(comm, spatial, args, seed, flat=False, H=2, H_kv=1, D=4, D_v=3):
    q, k, v, do, dl = global_inputs(spatial, seed, H, H_kv, D, D_v)
    lay = ad.Layout("contiguous", comm.world_size, spatial[0] if not flat else q[0, 0, ..., 0].numel())
    rows = ad.Layout("contiguous", comm.world_size, spatial[0])
    ql, kl, vl = (ad.shard(x, rows, comm.rank).requires_grad_() for x in (q, k, v))
    if flat:
        out, lse = ad.neighborhood(*(x.flatten(2, -2) for x in (ql, kl, vl)), *args, layout=lay, group=comm,
                                   spatial_shape=spatial, return_lse=True)
        out, lse = out.unflatten(2, ql.shape[2:-1]), lse.unflatten(2, ql.shape[2:-1])
    else:
        out, lse = ad.neighborhood(ql, kl, vl, *args, layout=lay, group=comm, return_lse=True)
    fwd = comm.log.summary()
    ((out * ad.shard(do, rows, comm.rank)).sum() + (lse * ad.shard(dl, rows, comm.rank)).sum()).backward()
    return out.detach(), lse.detach(), ql.grad, kl.grad, vl.grad, fwd, comm.log.summary()


def global_inputs(spatial, seed, H, H_kv, D, D_v):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g, dtype=torch.float64) for s in
                 ((1, H, *spatial, D), (1, H_kv, *spatial, D), (1, H_kv, *spatial, D_v), (1, H, *spatial, D_v),
                  (1, H, *spatial)))


def check(W, spatial, args, seed=0, flat=False, **sizes):
    q, k, v, do, dl = global_inputs(spatial, seed, sizes.get("H", 2), sizes.get("H_kv", 1), sizes.get("D", 4),
                                    sizes.get("D_v", 3))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = anyattn.neighborhood(q, k, v, *args, return_lse=True)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    res = run_threads(W, rank_run, spatial, args, seed, flat, **sizes)
    for i, want in enumerate((out, lse) + grads):
        got = torch.cat([r[i] for r in res], 2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    return res


axis = st.tuples(st.integers(1, 3), st.integers(1, 2), st.booleans())  # kernel, dilation, causal


@given(W=st.integers(1, 4), rows=st.integers(2, 5), rest=st.lists(st.integers(1, 5), max_size=2),
       ax0=axis, s0=st.integers(1, 3), inner=st.lists(axis, min_size=2, max_size=2), seed=st.integers(0, 3))
def test_property_sharded_neighborhood_equals_single_process(W, rows, rest, ax0, s0, inner, seed):
    spatial = (rows * W,) + tuple(rest)
    axes = [ax0] + inner[:len(rest)]
    ks = tuple(min(k, n // d) if n // d >= 1 else 1 for (k, d, _), n in zip(axes, spatial))
    ds = tuple(d if k * d <= n else 1 for (k, d, _), n in zip(axes, spatial))
    ks = tuple(min(k, n // d) for k, d, n in zip(ks, ds, spatial))
    ss = (min(s0, ks[0]),) + (1,) * len(rest)
    cs = tuple(c for _, _, c in axes)
    try:
        check(W, spatial, (ks, ds, ss, cs), seed)
    except ValueError as e:
        assume("halo" not in str(e))
        raise


@pytest.mark.parametrize("W,spatial,args", [
    (3, (24,), (5, 2, 2, False)),  # 1-D, dilation and stride on the sharded axis
    (3, (9, 6), ((3, 5), (1, 1), (1, 2), (True, False))),  # 2-D causal rows, strided columns
    (2, (8, 4, 3), ((3, 3, 2), (2, 1, 1), (3, 1, 1), (False, False, True))),  # 3-D
])
def test_named_cases_with_gqa_and_lse(W, spatial, args):
    check(W, spatial, args, H=4, H_kv=2, D=6, D_v=5)


def test_flattened_inputs_and_halo_bytes():
    res = check(4, (8, 3), ((3, 3), 1, 1, False), flat=True)
    row = 1 * 1 * 3 * (4 + 3) * 8  # one grid row of packed K/V: B * H_kv * cols * (D + D_v) float64
    for r, x in enumerate(res):
        neighbours = (r > 0) + (r < 3)
        assert x[5] == {"bytes_sent": neighbours * row, "bytes_received": neighbours * row,
                        "ops": {"send": neighbours, "recv": neighbours}}
        assert x[6]["bytes_sent"] == 2 * neighbours * row  # the halo gradients travel back


def _too_big(comm):
    lay = ad.Layout("contiguous", comm.world_size, 8)
    x = torch.randn(1, 1, 2, 4)
    ad.neighborhood(x, x, x, 7, layout=lay, group=comm)


def test_halo_larger_than_a_shard_is_a_clear_error():
    with pytest.raises(ValueError, match="larger than a neighbour's shard"):
        run_threads(4, _too_big)
    with pytest.raises(ValueError, match="'contiguous'"):
        run_threads(2, lambda c: ad.neighborhood(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2),
                                                  torch.ones(1, 1, 2, 2), 3, layout=ad.Layout("stripe", 2, 4),
                                                  group=c))
