"""The communication layer (values, byte-log formulas, gradients) and the layouts, on thread ranks."""
import time

import pytest
import torch
from hypothesis import given, strategies as st

import anyattn.distributed as ad
from anyattn.distributed.testing import run_threads

WS = [1, 2, 3, 4, 5, 8]


def _x(rank, *shape, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _collectives(comm):
    W, r = comm.world_size, comm.rank
    x = _x(r, 2, 3)
    out = {"gather": comm.all_gather(x)}
    b = x.numel() * 8
    assert (comm.log.bytes_sent, comm.log.bytes_received) == ((W - 1) * b, (W - 1) * b)
    comm.log.reset()
    y = _x(r, 3, 2 * W, 2)
    out["a2a"] = comm.all_to_all(y, split_dim=1, cat_dim=0)
    assert comm.log.bytes_sent == comm.log.bytes_received == (W - 1) * y.numel() * 8 // W
    comm.log.reset()
    out["bcast"] = comm.broadcast(_x(r, 4), src=W - 1)
    assert comm.log.bytes_sent == ((W - 1) * 32 if r == W - 1 else 0)
    assert comm.log.bytes_received == (0 if r == W - 1 else 32)
    comm.log.reset()
    out["sum"] = comm.all_reduce(_x(r, 5))
    out["max"] = comm.all_reduce(_x(r, 5), op="max")
    assert comm.log.bytes_sent == comm.log.bytes_received == 2 * (2 * (W - 1) * 40 // W)
    comm.log.reset()
    nxt, prv = (r + 1) % W, (r - 1) % W
    out["ring"] = comm.sendrecv(_x(r, 6, dtype=torch.bfloat16), nxt, ((6,), torch.bfloat16), prv)
    assert comm.log.bytes_sent == comm.log.bytes_received == (12 if W > 1 else 0)
    comm.barrier()
    assert comm.log.ops == {"sendrecv": 1, "barrier": 1} and len(comm.log.records) == 2
    return out


@pytest.mark.parametrize("W", WS)
def test_collectives_values_and_bytes(W):
    res = run_threads(W, _collectives)
    xs = [_x(r, 2, 3) for r in range(W)]
    ys = [_x(r, 3, 2 * W, 2) for r in range(W)]
    for r, o in enumerate(res):
        assert all(torch.equal(a, b) for a, b in zip(o["gather"], xs))
        want = torch.cat([y.chunk(W, 1)[r] for y in ys], 0)
        assert torch.equal(o["a2a"], want)
        assert torch.equal(o["bcast"], _x(W - 1, 4))
        assert torch.allclose(o["sum"], sum(_x(s, 5) for s in range(W)))
        assert torch.equal(o["max"], torch.stack([_x(s, 5) for s in range(W)]).amax(0))
        assert torch.equal(o["ring"], _x((r - 1) % W, 6, dtype=torch.bfloat16))


def _tags(comm):
    W, r = comm.world_size, comm.rank
    a = comm.isend(torch.full((2,), float(r)), (r + 1) % W, tag=1)
    b = comm.isend(torch.full((3,), float(-r)), (r + 1) % W, tag=2)
    got2 = comm.irecv((((3,)), torch.float32), (r - 1) % W, tag=2).wait()  # received out of order
    got1 = comm.recv(torch.empty(2), (r - 1) % W, tag=1)
    a.wait(), b.wait()
    return got1, got2, comm.log.ops


@pytest.mark.parametrize("W", [1, 2, 3])
def test_point_to_point_tags(W):
    for r, (g1, g2, ops) in enumerate(run_threads(W, _tags)):
        assert torch.equal(g1, torch.full((2,), float((r - 1) % W)))
        assert torch.equal(g2, torch.full((3,), float(-((r - 1) % W))))
        assert ops == {"send": 2, "recv": 2}


def _grads(comm):
    W, r = comm.world_size, comm.rank
    x = _x(r, 2, 2 * W).requires_grad_()
    w = [_x(1000 + 10 * r + s, 2, 2 * W) for s in range(W)]  # rank-specific weights on every piece
    parts = comm.all_gather(x)
    loss = sum((p * ws).sum() for p, ws in zip(parts, w))
    y = comm.all_to_all(x * x, split_dim=1, cat_dim=0)
    loss = loss + (y * _x(500 + r, *y.shape)).sum()
    loss = loss + (comm.all_reduce(x) * _x(600 + r, *x.shape)).sum()
    loss = loss + (comm.broadcast(x, src=0) * _x(700 + r, *x.shape)).sum()
    z = comm.sendrecv(x * 3, (r + 1) % W, x, (r - 1) % W)
    loss = loss + (z * _x(800 + r, *x.shape)).sum()
    loss.backward()
    return x.grad


@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_collectives_are_differentiable(W):
    got = run_threads(W, _grads)
    xs = [_x(r, 2, 2 * W) for r in range(W)]
    for s in range(W):
        want = sum(_x(1000 + 10 * r + s, 2, 2 * W) for r in range(W))
        # all_to_all: rank s's part j went to rank j, landing at row block s of j's output
        a2a = torch.zeros(2, 2 * W, dtype=torch.float64)
        for j in range(W):
            wt = _x(500 + j, 2 * W, 2)
            a2a[:, 2 * j:2 * j + 2] = wt[2 * s:2 * s + 2]
        want = want + 2 * xs[s] * a2a
        want = want + sum(_x(600 + r, 2, 2 * W) for r in range(W))
        if s == 0:
            want = want + sum(_x(700 + r, 2, 2 * W) for r in range(W))
        want = want + 3 * _x(800 + (s + 1) % W, 2, 2 * W)
        torch.testing.assert_close(got[s], want)


def _fails(comm):
    if comm.rank == 1:
        raise KeyError("rank 1 broke")
    comm.recv(torch.empty(1), (comm.rank + 1) % comm.world_size)  # would wait forever


def test_an_exception_in_one_rank_is_reraised_without_hanging():
    t0 = time.monotonic()
    with pytest.raises(KeyError, match="rank 1 broke"):
        run_threads(4, _fails)
    assert time.monotonic() - t0 < 10


def test_comm_argument_errors():
    with pytest.raises(TypeError, match="group must be"):
        ad.as_comm("world")
    with pytest.raises(ValueError, match="init_process_group"):
        ad.as_comm(None)

    def bad(comm):
        with pytest.raises(ValueError, match="dst must be a rank"):
            comm.send(torch.ones(1), 5)
        with pytest.raises(ValueError, match="op must be one of"):
            comm.all_reduce(torch.ones(1), op="mean")
        with pytest.raises(ValueError, match="divisible by the world size"):
            comm.all_to_all(torch.ones(3), 0, 0)
        assert ad.as_comm(comm) is comm
    run_threads(2, bad)


# ---------------------------------------------------------------------------------------------- layouts
def test_layout_positions():
    assert ad.Layout("contiguous", 2, 8).positions(1).tolist() == [4, 5, 6, 7]
    assert ad.Layout("zigzag", 2, 8).positions(0).tolist() == [0, 1, 6, 7]
    assert ad.Layout("zigzag", 2, 8).positions(1).tolist() == [2, 3, 4, 5]
    assert ad.Layout("stripe", 3, 9).positions(2).tolist() == [2, 5, 8]
    lay = ad.Layout("zigzag", 4, 16)
    assert lay.n_local == 4 and lay.chunk == 2
    assert [tuple(s) for s in lay.segments(1)] == [(2, 2, 1, 0), (12, 2, 1, 2)]


@pytest.mark.parametrize("kind,W,n,need", [("contiguous", 3, 10, "W = 3"), ("zigzag", 3, 9, "2W = 6"),
                                           ("stripe", 4, 6, "W = 4")])
def test_layout_divisibility_errors(kind, W, n, need):
    with pytest.raises(ValueError, match=need):
        ad.Layout(kind, W, n)


def test_layout_argument_errors():
    with pytest.raises(ValueError, match="kind must be one of"):
        ad.Layout("ring", 2, 8)
    with pytest.raises(ValueError, match="world_size must be an int"):
        ad.Layout("stripe", 0, 8)
    with pytest.raises(ValueError, match="rank must be"):
        ad.Layout("stripe", 2, 8).positions(2)
    with pytest.raises(ValueError, match="must equal layout.n_global"):
        ad.shard(torch.zeros(1, 1, 6, 2), ad.Layout("stripe", 2, 8), 0)


def _roundtrip(comm, layout, x, dim):
    xl = ad.shard(x, layout, comm.rank, dim).requires_grad_()
    full = ad.unshard(xl, layout, group=comm, dim=dim)
    (full * (comm.rank + 1)).sum().backward()
    return full.detach(), xl.grad


@given(kind=st.sampled_from(["contiguous", "zigzag", "stripe"]), W=st.integers(1, 6), m=st.integers(1, 3),
       dim=st.sampled_from([0, 2, -1]))
def test_shard_unshard_roundtrip(kind, W, m, dim):
    n = (2 * W if kind == "zigzag" else W) * m
    shape = [2, 3, 4]
    shape[dim] = n
    x = torch.randn(*shape, dtype=torch.float64)
    lay = ad.Layout(kind, W, n)
    res = run_threads(W, _roundtrip, lay, x, dim)
    cover = torch.cat([lay.positions(r) for r in range(W)]).sort().values
    assert torch.equal(cover, torch.arange(n))
    for r, (full, g) in enumerate(res):
        assert torch.equal(full, x)
        assert torch.equal(ad.shard(x, lay, r, dim), x.index_select(dim % 3, lay.positions(r)))
        torch.testing.assert_close(g, torch.full_like(g, W * (W + 1) / 2))  # sum over ranks of (rank + 1)
