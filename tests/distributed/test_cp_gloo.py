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
    got = pool.run(_grads, world_size=W)
    from anyattn.distributed.testing import run_threads
    want = run_threads(W, _grads)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    for r, (g1, g2, ops) in enumerate(pool.run(_tags, world_size=W)):
        assert torch.equal(g1, torch.full((2,), float((r - 1) % W)))


# ---------------------------------------------------------------------------------------------- attention
ATTN = [dict(kind="zigzag", mask="causal", bias="alibi", algo="ring"),
        dict(kind="stripe", mask="document", bias="spatial", algo="allgather"),
        dict(kind="contiguous", mask="mask_mod", bias="t5_bi", algo="ulysses", H=12, H_kv=2),
        dict(kind="zigzag", mask="key_padding", bias="none", algo="ring", kv_heads_per_pass=1)]


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("spec", ATTN, ids=lambda s: s["algo"] + "-" + s["kind"])
def test_gloo_attention_equals_single_process(pool, W, spec):
    from anyattn.distributed.testing import run_threads
    from attn_cases import case, max_rel_error, rank_run
    c = case(W=W, **spec)
    res = pool.run(rank_run, c, world_size=W)
    errs = max_rel_error(c, res)
    assert max(errs.values()) <= 1e-10, errs
    threads = run_threads(W, rank_run, c)
    assert [r["log"] for r in res] == [r["log"] for r in threads]  # the same bytes and ops as the formulas' tests



# ---------------------------------------------------------------------------------------------- neighborhood
@pytest.mark.parametrize("W", [2, 3, 4])
def test_gloo_neighborhood_equals_single_process(pool, W):
    import anyattn
    from test_cp_neighborhood import global_inputs, rank_run
    spatial, args = (4 * W, 5), ((3, 3), (2, 1), (1, 2), (False, True))
    q, k, v, do, dl = global_inputs(spatial, 1, 2, 1, 4, 3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = anyattn.neighborhood(q, k, v, *args, return_lse=True)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    res = pool.run(rank_run, spatial, args, 1, world_size=W)
    for i, want in enumerate((out, lse) + grads):
        torch.testing.assert_close(torch.cat([r[i] for r in res], 2), want, rtol=1e-10, atol=1e-10)

# ---------------------------------------------------------------------------------------------- last: restarts the pool
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


# ---------------------------------------------------------------------------------------------- bench helpers
def test_bench_helpers_remote_contender_and_peak_memory():
    from anyattn.bench import distributed as bd
    from anyattn.bench.workloads.cp_attention import memory_rank, rank_attention
    call = bd.remote(2, rank_attention, 64, "zigzag", "ring", name="t")
    x = {"q": torch.zeros(3, requires_grad=True)}
    call(x).backward()  # the ranks ran forward and backward; the parent's scalar is free
    res = bd.last_results[("t", True)]
    assert len(res) == 2 and res[0]["log"]["ops"] == {"sendrecv": 4} and res[0]["rank_s"] > 0
    peaks = bd.peak_memory(2, memory_rank, 512, "zigzag", "ring", warmup_args=(256, "zigzag", "ring"),
                           fixed_threshold=True)
    # inputs: 3 x (1, 8, 256, 64) fp32 = 1.5 MiB per rank, and the run allocates more than nothing
    assert all(p["with_inputs"] > p["without_inputs"] > 0 for p in peaks)
    bd.pool(2).close()
