"""Context-parallel linear family, MoM, SSD and selective scan (`ad.linear`, `ad.ssd`, `ad.selective_scan`)
on thread-backed ranks against the single-process float64 run: outputs, final states, the gradients of
every input (sharded ones gathered, replicated ones summed over the ranks) and of the initial state
(on rank 0), for every algorithm and layout it supports; the summary's bytes; bf16 error growth."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import anyattn.distributed as ad
from anyattn.distributed.testing import run_threads

from lin_cases import OPS, make, max_rel_error, rank_run

TOL = 1e-10

# (algo, layout, W): every op runs each of these
RUNS = [("summary", "contiguous", 3), ("summary", "zigzag", 2), ("ulysses", "stripe", 2), ("ulysses", "zigzag", 4),
        ("pipeline:8", "contiguous", 3), ("auto", "contiguous", 4)]


def _check(name, kind, W, algo, **sizes):
    res = run_threads(W, rank_run, name, kind, W, algo, sizes)
    errs = max_rel_error(name, res, **sizes)
    assert errs.pop("dS0_elsewhere") == 0.0, "initial_state's gradient must be on rank 0 only"
    assert max(errs.values()) <= TOL, errs
    return res


@pytest.mark.parametrize("algo,kind,W", RUNS, ids=[f"{a}-{k}-W{w}" for a, k, w in RUNS])
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_and_algorithm_equals_single_process(name, algo, kind, W):
    if name == "linear_noncausal" and algo != "summary":
        pytest.skip("non-causal linear attention is one all-reduce whatever algo says")
    _check(name, kind, W, algo)


@pytest.mark.parametrize("W", [1, 2, 3, 4, 5, 6, 7, 8])
def test_world_sizes_one_to_eight(W):
    for algo in ("summary", "pipeline", "pipeline:4") + (("ulysses",) if 8 % W == 0 else ()):
        _check("gated_delta_rule", "contiguous", W, algo, H=8, N=8 * W, D=3)


@given(name=st.sampled_from(["gla", "gated_delta_rule", "kda", "retention_token", "ssd", "selective_scan"]),
       W=st.integers(1, 4), n=st.integers(1, 7), D=st.integers(1, 5), B=st.integers(1, 2),
       algo=st.sampled_from(["summary", "pipeline:3", "ulysses"]), zigzag=st.booleans())
def test_property_shapes(name, W, n, D, B, algo, zigzag):
    kind = "zigzag" if zigzag and not algo.startswith("pipeline") else "contiguous"
    H = 4
    if algo == "ulysses" and H % W:
        algo = "summary"
    _check(name, kind, W, algo, B=B, H=H, N=(2 if kind == "zigzag" else 1) * W * n, D=D)


def _map_bytes(name, **sizes):
    args, dims, S0, kw = make(name, **sizes)
    B, H, K, V = S0.shape
    m = {"gla": B * H * K, "gated_delta_rule": B * H * K * K, "retention_token": B * H}[name]
    return (m + S0.numel()) * 8


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "retention_token"])
def test_summary_bytes_do_not_grow_with_n(name):
    W = 4
    logs = []
    for N in (16, 64):
        res = run_threads(W, rank_run, name, "contiguous", W, "summary", {"N": N})
        logs.append([r["log"] for r in res])
        for r in res:                      # one all_gather of one packed map per rank: (W - 1) maps each way
            assert r["log"]["ops"] == {"all_gather": 1}
            assert r["log"]["bytes_sent"] == r["log"]["bytes_received"] == (W - 1) * _map_bytes(name, N=N)
    assert logs[0] == logs[1]


@pytest.mark.parametrize("algo", ["summary", "ulysses", "pipeline:4"])
def test_bf16_error_grows_at_most_linearly_in_w(algo):
    errs = {}
    for W in (1, 2, 4, 8):
        res = run_threads(W, rank_run, "gated_delta_rule", "contiguous", W, algo, {"H": 8, "N": 64, "D": 8},
                          torch.bfloat16)
        errs[W] = max_rel_error("gated_delta_rule", res, H=8, N=64, D=8)["o0"]
    assert errs[1] < 2e-2, errs
    for W in (2, 4, 8):
        assert errs[W] <= W * errs[1], errs


def _bad(comm, case):
    args, dims, S0, kw = make("gated_delta_rule", N=12)
    layout = ad.Layout(case.get("kind", "contiguous"), comm.world_size, 12)
    local = [ad.shard(a, layout, comm.rank, d) for a, d in zip(args, dims)]
    if case.get("short"):
        local[0] = local[0][:, :, :-1]
    return ad.linear(case.get("op", "gated_delta_rule"), *local, layout=layout, group=comm,
                     algo=case.get("algo", "auto"), **case.get("kw", {}))


@pytest.mark.parametrize("case,err,match", [
    ({"algo": "ring"}, ValueError, "algo must be one of"),
    ({"algo": "pipeline:0"}, ValueError, "'pipeline:P'"),
    ({"op": "softmax"}, ValueError, "op must be one of"),
    ({"algo": "ulysses", "W": 3}, ValueError, "must be divisible by W = 3"),
    ({"algo": "pipeline", "kind": "zigzag"}, ValueError, "needs the 'contiguous' layout"),
    ({"algo": "summary", "kind": "stripe"}, ValueError, "one run per row"),
    ({"short": True}, ValueError, "local positions"),
    ({"kw": {"initial_state": torch.zeros(2, 4, 4, 3, dtype=torch.float64)}}, ValueError, "initial_state must have"),
    ({"kw": {"bogus": 1}}, TypeError, "do not match anyattn.linear.gated_delta_rule"),
])
def test_errors(case, err, match):
    with pytest.raises(err, match=match):
        run_threads(case.get("W", 2), _bad, case)
