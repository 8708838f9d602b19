"""The benchmark harness runs end to end on tiny sizes: table, JSON, plot, memory subprocess."""
import json

import pytest

from anyattn.bench import memory, report, runner
from anyattn.bench.timing import alternating
from anyattn.bench.workloads import get_cases, names


def test_workloads_are_discovered():
    assert {"softmax", "overhead", "memory"} <= set(names())
    with pytest.raises(ValueError, match="workload must be one of"):
        get_cases("nope", True)


@pytest.mark.parametrize("name", names())
def test_every_workload_builds_quick_cases(name):
    cases = get_cases(name, True)
    assert cases
    for c in cases:
        assert c.baseline in c.contenders or c.baseline in c.missing or c.baseline in c.skip
        assert c.flops > 0


def test_alternating_rounds_and_medians():
    calls = []
    t = alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, budget_s=0.01,
                    min_repeats=3, max_repeats=3)
    assert len(t["a"]) == len(t["b"]) == 3
    assert calls[:2] == ["a", "b"] and "ba" in "".join(calls)  # order rotates between rounds


def test_runner_quick_softmax(tmp_path):
    res = runner.run(["softmax"], quick=True, memory=False, budget_s=0.05, progress=False)
    case = res["cases"][0]
    for n in ("torch_sdpa", "blocked", "auto", "sdpa", "reference"):
        r = case["contenders"][n]
        assert r["forward_s"] > 0 and r["fwd_bwd_s"] > 0
        assert r["rel_fro"] < 1e-5  # exact methods agree with torch SDPA
    assert case["contenders"]["torch_sdpa"]["speedup_forward"] == 1.0
    text = report.table(res)
    assert "torch_sdpa" in text and "flex" in text  # a skipped peer is reported, not hidden
    path = report.write_json(res, str(tmp_path))
    assert json.load(open(path))["cases"]
    png = report.plot(res, str(tmp_path))
    assert png is None or open(png, "rb").read(4) == b"\x89PNG"


def test_memory_child_measures_peak():
    m = memory.measure("memory", 0, "reference", True, True, timeout_s=120)
    b = memory.measure("memory", 0, "blocked", True, True, timeout_s=120)
    assert "error" not in m and "error" not in b, (m, b)
    # quick case: N=1024, H=8: the reference's scores alone are 32 MiB, and it keeps several such
    # tensors; blocked holds one (256 x 512) tile per head (4 MiB) at a time.
    assert m["forward_bytes"] >= 32 * 2**20
    assert m["forward_bytes"] > 2 * b["forward_bytes"]
    assert m["fwd_bwd_bytes"] > 2 * b["fwd_bwd_bytes"]


def test_a_failing_contender_is_reported_not_fatal():
    import torch

    from anyattn.bench.case import Case
    from anyattn.bench.runner import Progress, run_case

    def boom(x):
        raise RuntimeError("peer exploded")

    case = Case("t", "tiny", {}, 1.0, lambda g: {"x": torch.ones(3, requires_grad=g)},
                {"ok": lambda x: x["x"] * 2, "boom": boom}, baseline="ok", exact="ok")
    res = run_case(case, 0, quick=True, memory=False, budget_s=0.01, roofline=1.0, progress=Progress(1, False))
    assert "boom" not in res["contenders"] and "peer exploded" in res["failed"]["boom"]
    assert res["contenders"]["ok"]["forward_s"] > 0
