"""The state-passing ops, short-convolution halos, attention offloading and a context-parallel model on real
gloo process groups (W = 2, 3, 4; one pool of worker processes for the file, 1 thread each)."""
import pytest
import torch

from anyattn.distributed.testing import GlooPool, run_threads

from cp_cases import conv_rank, decode_rank, generate_rank, model, model_errors, model_rank
from lin_cases import max_rel_error, rank_run


@pytest.fixture(scope="module")
def pool():
    with GlooPool(4, sizes=(2, 3)) as p:
        yield p


LIN = [("gated_delta_rule", "contiguous", 4, "summary"), ("gated_delta_rule", "zigzag", 2, "ulysses"),
       ("kda", "contiguous", 3, "pipeline:4"), ("ssd", "zigzag", 2, "summary"),
       ("selective_scan_groups", "contiguous", 4, "ulysses"), ("mom", "contiguous", 3, "summary"),
       ("linear_cosformer", "contiguous", 4, "pipeline:2"), ("retention_head", "stripe", 2, "ulysses")]


@pytest.mark.parametrize("name,kind,W,algo", LIN, ids=[f"{n}-{a}-{k}-W{w}" for n, k, w, a in LIN])
def test_gloo_linear_equals_single_process(pool, name, kind, W, algo):
    res = pool.run(rank_run, name, kind, W, algo, world_size=W)
    errs = max_rel_error(name, res)
    assert errs.pop("dS0_elsewhere") == 0.0
    assert max(errs.values()) <= 1e-10, errs
    assert [r["log"] for r in res] == [r["log"] for r in run_threads(W, rank_run, name, kind, W, algo)]


def test_gloo_causal_conv(pool):
    g = torch.Generator().manual_seed(3)
    x, w, dy = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((2, 18, 3), (3, 4), (2, 18, 3)))
    got = pool.run(conv_rank, "zigzag", x, w, dy, 4, world_size=3)
    want = run_threads(3, conv_rank, "zigzag", x, w, dy, 4)
    for a, b in zip(got, want):
        for t, u in zip(a, b):
            torch.testing.assert_close(t, u, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shard,W", [("heads", 3), ("sequence", 4)])
def test_gloo_remote_decode_equals_local(pool, shard, W):
    assert max(pool.run(decode_rank, shard, {}, world_size=W)[0]) <= 1e-6


def test_gloo_generate_with_remote_caches(pool):
    assert pool.run(generate_rank, "sequence", world_size=2)[0] <= 1e-6


def test_gloo_context_parallel_model(pool):
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = model(16, seed=1).state_dict()
    out, rest, fp32 = model_errors(x, weights, pool.run(model_rank, "zigzag", "auto", x, weights, world_size=2)[0])
    assert out <= 1e-10 and rest <= 1e-10 and fp32 <= 1e-6, (out, rest, fp32)
