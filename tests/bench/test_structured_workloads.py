"""The issue-16 benchmark workloads build their quick cases, every contender runs, and the contenders
agree with the exact column."""
import pytest
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads.structured import WORKLOADS
from helpers import quick_cases


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_quick_cases_run_and_agree(name):
    for case in quick_cases(WORKLOADS, name):
        inputs = case.make_inputs(False)
        with torch.no_grad():
            outs = {n: first_tensor(f(inputs)) for n, f in case.contenders.items()}
        for n, o in outs.items():
            assert torch.isfinite(o).all(), (case.label, n)
        if case.exact is not None:
            for n, o in outs.items():
                if o.shape == outs[case.exact].shape:
                    torch.testing.assert_close(o, outs[case.exact], rtol=1e-4, atol=1e-4, msg=f"{case.label} {n}")
        if case.backward:
            inputs = case.make_inputs(True)
            ours = next(n for n in case.contenders if n not in case.forward_only)
            first_tensor(case.contenders[ours](inputs)).sum().backward()
            assert any(t.grad is not None for t in inputs.values() if isinstance(t, torch.Tensor))


def test_full_sizes_declared():
    comb = WORKLOADS["combiner"](False)
    assert [c.params["N"] for c in comb] == [2048, 16384, 65536] and comb[1].baseline == "sdpa_causal"
    assert all(c.params["H"] == 8 and c.params["D"] == 64 for c in comb)
    simp = WORKLOADS["simplicial"](False)
    assert [c.params["N"] for c in simp] == [256, 2048, 4096, 8192] and simp[0].exact == "dense_loop"
    chim = WORKLOADS["chimera"](False)
    assert all(c.params["V"] == 32 and c.params["T"] == 1024 for c in chim)
