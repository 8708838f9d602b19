"""The linear-family benchmark workloads build their quick cases and every contender runs."""
import pytest
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads.linear_family import WORKLOADS
from helpers import quick_cases


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_quick_cases_run(name):
    for case in quick_cases(WORKLOADS, name):
        inputs = case.make_inputs(False)
        # fla's token-by-token references are slow; run them only where they are the exact column
        run = [n for n in case.contenders if n in ("chunk", "step", case.baseline, case.exact)]
        outs = {n: first_tensor(case.contenders[n](inputs)) for n in run}
        for n, o in outs.items():
            assert torch.isfinite(o).all(), n
        if case.exact is not None:
            ours = outs.get("chunk")
            torch.testing.assert_close(ours, outs[case.exact], rtol=1e-3, atol=1e-3)
        if case.backward:
            inputs = case.make_inputs(True)
            out = first_tensor(case.contenders["chunk"](inputs))
            out.sum().backward()
            assert inputs["q"].grad is not None


def test_full_sizes_declared():
    case = WORKLOADS["gla"](False)[1]
    assert case.params["N"] == 16384 and case.baseline == "sdpa"
    assert "fla_naive_chunk" in case.missing
