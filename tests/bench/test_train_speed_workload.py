"""The training-speed workloads build their quick cases; every contender runs forward and backward, and the
hand-written backward's contender agrees with the landed one (and bf16 with float64) on the output."""
import pytest
import torch

from anyattn.bench.case import first_tensor
from anyattn.bench.workloads.train_speed import WORKLOADS
from helpers import quick_cases


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_quick_cases_run(name):
    for case in quick_cases(WORKLOADS, name):
        inputs = case.make_inputs(True)
        outs = {}
        for n, fn in case.contenders.items():
            out = first_tensor(fn(inputs))
            outs[n] = out.detach()
            if n not in case.forward_only:
                out.float().square().mean().backward()
        ref = outs[case.exact].double()
        for n, o in outs.items():
            tol = 1e-2 if o.dtype == torch.bfloat16 else 1e-4
            assert float((o.double() - ref).norm() / ref.norm()) <= tol, (case.label, n)
        grads = [x.grad for x in inputs.values() if isinstance(x, torch.Tensor) and x.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
