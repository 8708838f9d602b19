"""The issue-15 benchmark workloads (titans, lightnet, flowformer, ecoformer, lla, parallax) build their
quick cases; the main contender runs forward (against the exact column where there is one) and backward."""
import pytest
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads import local_linear, memories
from helpers import quick_cases

MAIN = {"titans": "chunk", "lightnet": "lightnet", "flowformer": "flowformer", "ecoformer": "ecoformer",
        "lla": "blocked", "parallax": "parallax"}
ALL = {**memories.WORKLOADS, **local_linear.WORKLOADS}


@pytest.mark.parametrize("name", sorted(ALL))
def test_quick_cases_run(name):
    for case in quick_cases(ALL, name):
        main = MAIN[name] if MAIN[name] in case.contenders else next(iter(case.contenders))
        x = case.make_inputs(False)
        out = first_tensor(case.contenders[main](x))
        assert torch.isfinite(out).all()
        if case.exact is not None and case.exact != main:
            want = first_tensor(case.contenders[case.exact](x))
            torch.testing.assert_close(out.double(), want.double(), rtol=1e-3, atol=1e-3)
        if case.backward and main not in case.forward_only:
            xg = case.make_inputs(True)
            first_tensor(case.contenders[main](xg)).sum().backward()
            assert xg["q"].grad is not None and torch.isfinite(xg["q"].grad).all()


def test_full_sizes_declared():
    titans = memories.WORKLOADS["titans"](False)
    assert [c.params["N"] for c in titans[:2]] == [4096, 16384] and titans[0].baseline == "recurrent"
    lla = local_linear.WORKLOADS["lla"](False)
    assert lla[-1].params["N"] == 16384 and "dense" in lla[-1].skip and lla[1].exact == "dense"
    assert local_linear.WORKLOADS["parallax"](False)[0].baseline == "attention"
