"""The cost model behind algo="auto" (`ad.cost`): feasibility, byte formulas against the measured log, the
projection to 8-64 devices."""
import pytest
import torch

import anyattn.distributed as ad
from anyattn.distributed import cost
from anyattn.distributed.testing import run_threads

from lin_cases import OPS, make


def _explain(comm, name, kind, N, H):
    args, dims, S0, kw = make(name, H=H, N=N)
    layout = ad.Layout(kind, comm.world_size, N)
    local = [ad.shard(a, layout, comm.rank, d) if d is not None else a for a, d in zip(args, dims)]
    return ad.explain_linear(OPS[name][0], *local, layout=layout, group=comm, backward=False)


@pytest.mark.parametrize("kind,W,H,allowed", [("contiguous", 4, 4, {"summary", "ulysses", "pipeline"}),
                                              ("contiguous", 3, 4, {"summary", "pipeline"}),
                                              ("zigzag", 4, 4, {"summary", "ulysses"}),
                                              ("stripe", 2, 4, {"ulysses"})])
def test_auto_picks_a_feasible_algorithm(kind, W, H, allowed):
    e = run_threads(W, _explain, "gated_delta_rule", kind, 8 * W, H)
    assert all(r["algo"] == e[0]["algo"] for r in e)            # every rank agrees
    assert e[0]["algo"] in allowed
    assert set(k for k in e[0]["estimates"] if k != "pipeline_parts") == allowed


def _bytes(comm, name, algo, N):
    args, dims, S0, kw = make(name, H=4, N=N)
    layout = ad.Layout("contiguous", comm.world_size, N)
    local = [ad.shard(a, layout, comm.rank, d) for a, d in zip(args, dims)]
    comm.log.reset()
    ad.linear(OPS[name][0], *local, layout=layout, group=comm, algo=algo)
    return comm.log.bytes_sent


@pytest.mark.parametrize("name", ["gated_delta_rule", "retention_token"])
@pytest.mark.parametrize("algo", ["summary", "ulysses", "pipeline"])
def test_byte_formulas_equal_the_log(name, algo):
    W, N = 4, 32
    got = max(run_threads(W, _bytes, name, algo, N))
    fam = "delta" if name == "gated_delta_rule" else "decay"
    args, dims, S0, kw = make(name, H=4, N=N)
    p = cost.lm_profile(fam, N // W, B=2, H=4, D=4)
    assert got == cost.bytes_per_rank(p, W, algo, element_size=8)


def test_summary_bytes_do_not_depend_on_n_and_ulysses_grow():
    p1, p2 = cost.lm_profile("delta", 1024), cost.lm_profile("delta", 4096)
    assert cost.bytes_per_rank(p1, 8, "summary") == cost.bytes_per_rank(p2, 8, "summary")
    assert cost.bytes_per_rank(p2, 8, "ulysses") == 4 * cost.bytes_per_rank(p1, 8, "ulysses")


def test_projection_rows_and_plot(tmp_path):
    rows = cost.projection(worlds=(8, 16), links=("nvlink", "infiniband"))
    assert [(r["link"], r["W"]) for r in rows] == [("nvlink", 8), ("nvlink", 16), ("infiniband", 8),
                                                   ("infiniband", 16)]
    assert all("ulysses" not in r for r in rows if r["W"] > 8)    # H = 8 heads cannot split over 16 ranks
    for r in rows:
        assert r["best"] == min(("summary", "ulysses", "pipeline"), key=lambda a: r.get(a, float("inf")))
    pytest.importorskip("matplotlib")
    assert cost.plot_projection(rows, str(tmp_path / "p.png")) and (tmp_path / "p.png").stat().st_size > 0


def test_no_feasible_algorithm_is_a_clear_error():
    with pytest.raises(ValueError, match="no context-parallel algorithm applies"):
        run_threads(3, _explain, "gated_delta_rule", "stripe", 12, 4)
