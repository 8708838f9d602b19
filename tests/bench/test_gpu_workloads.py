"""The GPU workloads (bench/workloads/gpu.py) and `--device` plumbing, run quick on the bench device."""
import pytest
import torch

from anyattn import cli
from anyattn.bench import runner
from anyattn.bench.device import ENV, on_device


@pytest.mark.cpu_only
def test_gpu_workloads_quick_on_cpu():
    res = runner.run(["gpu_masked", "gpu_alibi", "gpu_neighborhood", "gpu_linear", "gpu_scan"], quick=True,
                     memory=False, budget_s=0.02, progress=False)
    for case in res["cases"]:
        assert not case["failed"], (case["label"], case["failed"])
        assert case["contenders"]["auto"]["forward_s"] > 0
    missing = {m for c in res["cases"] for m in c["missing"]}
    assert {"natten", "fla", "mamba_ssm"} <= missing  # the direct peers need CUDA: reported, not faked
    assert res["machine"]["device"] == "cpu"


def test_on_device_keeps_leaves():
    x = {"a": torch.zeros(2, requires_grad=True), "b": 3}
    y = on_device(x, torch.device("meta"))
    assert y["a"].device.type == "meta" and y["a"].is_leaf and y["a"].requires_grad and y["b"] == 3


def test_cli_device_without_cuda(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv(ENV, raising=False)
    assert cli.main(["bench", "gpu_alibi", "--quick", "--device", "cuda"]) == 2
    assert "is_available() is False" in capsys.readouterr().err
