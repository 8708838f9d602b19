"""Public surface: methods(), explain(), auto's choices."""
import pytest
import torch

import anyattn
from anyattn import masks


def qkv(N_q=16, N_k=16, H=2, H_kv=2):
    return torch.randn(1, H, N_q, 8), torch.randn(1, H_kv, N_k, 8), torch.randn(1, H_kv, N_k, 8)


def test_methods_lists_exact_engines():
    m = anyattn.methods()
    for name in ("reference", "sdpa", "blocked"):
        assert m[name].startswith("exact")


@pytest.mark.cpu_only  # auto's CPU choices (CUDA prefers flex)
def test_explain_auto_choices():
    q, k, v = qkv()
    assert anyattn.explain(q, k, v).method == "sdpa"
    assert anyattn.explain(q, k, v, mask=masks.Causal()).method == "sdpa"
    assert anyattn.explain(q, k, v, mask=torch.ones(16, 16, dtype=torch.bool)).method == "sdpa"
    e = anyattn.explain(q, k, v, mask=masks.SlidingWindow(4))
    assert e.method == "blocked" and "not expressible in SDPA" in e.reason
    assert anyattn.explain(q, k, v, mask=masks.Causal() & masks.KeyPadding(torch.tensor([3]))).method == "blocked"


@pytest.mark.cpu_only  # auto's CPU choices (CUDA prefers flex)
def test_auto_avoids_materializing_large_bottom_right_masks(monkeypatch):
    from anyattn import plan
    q, k, v = qkv(N_q=8, N_k=32)
    assert anyattn.explain(q, k, v, mask=masks.Causal()).method == "sdpa"
    monkeypatch.setattr(plan, "MAX_SDPA_MASK_ELEMENTS", 100)
    e = anyattn.explain(q, k, v, mask=masks.Causal())
    assert e.method == "blocked" and "dense mask" in e.reason


def test_auto_runs_what_explain_says():
    q, k, v = qkv()
    mask = masks.SlidingWindow(3, 3)
    torch.testing.assert_close(anyattn.attention(q, k, v, mask=mask),
                               anyattn.attention(q, k, v, mask=mask, method="blocked"))


def test_cli_check_and_explain(capsys):
    from anyattn.cli import main
    assert main(["check"]) == 0
    assert "blocked" in capsys.readouterr().out
    assert main(["explain", "--mask", "window", "--n-q", "64"]) == 0
    assert capsys.readouterr().out.startswith("blocked")
