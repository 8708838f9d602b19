"""The SSM-family benchmark workloads build their quick cases and every contender runs and agrees."""
import pytest
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads.ssm_family import WORKLOADS
from helpers import quick_cases


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_quick_cases_run(name):
    for case in quick_cases(WORKLOADS, name):
        inputs = case.make_inputs(False)
        with torch.no_grad():
            outs = {n: first_tensor(f(inputs)) for n, f in case.contenders.items()}
        for n, o in outs.items():
            assert torch.isfinite(o).all(), n
        if case.exact is not None:
            shapes = {tuple(o.shape) for o in outs.values()}
            assert len(shapes) == 1, f"{case.label}: contenders must share the exact column's shape, got {shapes}"
            ours = outs["fft" if name == "longconv" else "chunk"]
            torch.testing.assert_close(ours, outs[case.exact], rtol=1e-3, atol=1e-3)
        if case.backward:
            inputs = case.make_inputs(True)
            ours = "fft" if name == "longconv" else "chunk"
            first_tensor(case.contenders[ours](inputs)).sum().backward()
            assert all(t.grad is not None for k, t in inputs.items()
                       if isinstance(t, torch.Tensor) and t.requires_grad and k not in ("q", "k", "v"))


def test_full_sizes_declared():
    m = [c for c in WORKLOADS["mamba"](False) if not c.params.get("decode") and "vs" not in c.params]
    assert [c.params["L"] for c in m] == [4096, 16384] and m[0].params["D"] == 1024 and m[0].baseline == "recurrent"
    s = [c for c in WORKLOADS["ssd"](False) if not c.params.get("decode") and "vs" not in c.params]
    assert [c.params["L"] for c in s] == [4096, 16384]
    lc = [c for c in WORKLOADS["longconv"](False) if not c.params.get("decode") and "vs" not in c.params]
    assert [c.params["L"] for c in lc] == [4096, 16384, 65536]
    assert lc[0].baseline == "conv1d" and "conv1d" in lc[2].skip and "sdpa" in lc[2].skip
