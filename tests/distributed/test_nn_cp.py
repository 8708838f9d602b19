"""A model of every context-parallel anyattn.nn layer family (attention with RoPE, Gated DeltaNet, KDA, GLA
with short convolutions, MoM, Mamba, Mamba-2) under `ad.context_parallel` equals the single-process model:
outputs and parameter gradients after the all-reduce (thread-backed ranks)."""
import pytest
import torch

import anyattn.distributed as ad
from anyattn import nn as ann
from anyattn.distributed.testing import run_threads

from cp_cases import model, model_errors, model_rank

CONFIGS = [(2, "contiguous", "summary"), (3, "contiguous", "pipeline"), (2, "zigzag", "ulysses"),
           (4, "zigzag", "auto")]


@pytest.mark.parametrize("W,kind,algo", CONFIGS, ids=[f"W{w}-{k}-{a}" for w, k, a in CONFIGS])
def test_model_equals_single_process(W, kind, algo):
    x = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(W), dtype=torch.float64)
    weights = model(16, seed=W).state_dict()
    res = run_threads(W, model_rank, kind, algo, x, weights)
    out, rest, fp32 = model_errors(x, weights, res[0])
    assert out <= 1e-10 and rest <= 1e-10, (out, rest)
    assert fp32 <= 1e-6, fp32        # A_log, D, dt_bias of the Mamba blocks go through fp32 in both runs
    for r in res[1:]:                # every rank ends with the same gradients
        assert all(torch.equal(r[1][n], res[0][1][n]) for n in r[1])


def _refusals(comm, which):
    layout = ad.Layout("contiguous", comm.world_size, 8)
    x = torch.zeros(1, 4, 16)
    layer = {"gdn": ann.GatedDeltaNetLayer(16, 2, 8), "attn": ann.Attention(16, 2), "s4d": ann.S4DLayer(16, 4),
             "mamba": ann.MambaBlock(16, d_state=4)}[which]
    with ad.context_parallel(comm, layout):
        layer(x, use_cache=which != "s4d")


@pytest.mark.parametrize("which,match", [("gdn", "decoding"), ("attn", "decoding"), ("mamba", "decoding"),
                                         ("s4d", "S4DLayer is not context-parallel")])
def test_layers_refuse_what_is_not_context_parallel(which, match):
    with pytest.raises(ValueError, match=match):
        run_threads(2, _refusals, which)


def test_context_is_per_thread_and_restored():
    def fn(comm):
        from anyattn.distributed.context import current
        assert current() is None
        with ad.context_parallel(comm, ad.Layout("contiguous", comm.world_size, 4)) as cp:
            assert current() is cp and cp.rank == comm.rank
        return current()
    assert run_threads(2, fn) == [None, None]
    with pytest.raises(ValueError, match="layout="):
        run_threads(1, lambda c: ad.context_parallel(c).__enter__())
