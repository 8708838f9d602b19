"""The same checks on real gloo process groups (W = 2, 3, 4), one pool of worker processes for the file."""
import pytest
import torch

import anyattn.distributed as ad
from anyattn.distributed.testing import GlooPool

from test_comm_layout import _collectives, _grads, _tags, _x


@pytest.fixture(scope="module")
def pool():
    with GlooPool(4, sizes=(2, 3)) as p:
        yield p


@pytest.mark.parametrize("W", [2, 3, 4])
def test_gloo_collectives_values_and_bytes(pool, W):
    res = pool.run(_collectives, world_size=W)
    xs = [_x(r, 2, 3) for r in range(W)]
    for r, o in enumerate(res):
        assert all(torch.equal(a, b) for a, b in zip(o["gather"], xs))
        assert torch.equal(o["bcast"], _x(W - 1, 4))
        assert torch.equal(o["ring"], _x((r - 1) % W, 6, dtype=torch.bfloat16))


@pytest.mark.parametrize("W", [2, 4])
def test_gloo_gradients_and_tags(pool, W):
    from test_comm_layout import test_collectives_are_differentiable  # noqa: F401  (same expected values)
    got = pool.run(_grads, world_size=W)
    from anyattn.distributed.testing import run_threads
    want = run_threads(W, _grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for r, (g1, g2, ops) in enumerate(pool.run(_tags, world_size=W)):
        assert torch.equal(g1, torch.full((2,), float((r - 1) % W)))


def _raise_on_rank_one(comm):
    if comm.rank == 1:
        raise KeyError("boom on rank 1")
    comm.all_gather(torch.ones(1))


def _ranks(comm):
    return comm.rank, comm.world_size, type(ad.as_comm(None)).__name__


def test_gloo_failure_is_reported_and_the_pool_recovers(pool):
    with pytest.raises(RuntimeError, match="boom on rank 1"):
        pool.run(_raise_on_rank_one, world_size=2)
    assert pool.run(_ranks) == [(r, 4, "Comm") for r in range(4)]
