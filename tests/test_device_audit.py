"""Device handling without a GPU.

1. A static audit: tensor factories in `src/anyattn` pass `device=` (or `**kwargs`), and host round
   trips (`.cpu()`, `.numpy()`) are deliberate; a line that builds on the host on purpose says why in a
   `# host:` comment. Exempt: `nn/` (module parameters are built on the host and moved with `.to()`, as
   in torch.nn), `bench/` (workloads build their inputs for `--device`), `tune/measure.py` (`anyattn tune`
   measures this machine's CPU) and `cli.py`.
2. The `meta` device runs the CUDA code paths for shapes: `sdpa`'s LSE path there is the CUDA
   memory-efficient kernel's (forward and backward, with and without the LSE's gradient), and every
   tensor an engine creates must be on the inputs' device or the call fails.
What stays unverified here (numbers on a real GPU) is listed in docs/gpu.md.
"""
import ast
import pathlib

import pytest
import torch

import anyattn
from anyattn import masks as M
from anyattn.softmax import sdpa

SRC = pathlib.Path(anyattn.__file__).parent
FACTORIES = {"arange", "empty", "zeros", "ones", "full", "rand", "randn", "randint", "randperm", "tensor",
             "as_tensor", "eye", "linspace", "logspace", "empty_strided", "scalar_tensor", "tril_indices",
             "triu_indices"}
EXEMPT = ("nn/", "bench/", "tune/measure.py", "cli.py")


def _sources():
    for p in sorted(SRC.rglob("*.py")):
        rel = p.relative_to(SRC).as_posix()
        if not rel.startswith(EXEMPT):
            yield rel, p.read_text()


def test_factories_in_src_pass_device():
    missing = []
    for rel, text in _sources():
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                continue
            if any(kw.arg in ("device", None) for kw in node.keywords):  # device= or **kwargs
                continue
            span = lines[node.lineno - 1:(node.end_lineno or node.lineno)]
            if not any("# host:" in ln for ln in span):
                missing.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert not missing, "tensor factories without device= (add device=, or say why in '# host:'):\n" + \
        "\n".join(missing)


def test_host_round_trips_are_deliberate():
    found = []
    for rel, text in _sources():
        for i, line in enumerate(text.splitlines(), 1):
            if (".cpu()" in line or ".numpy()" in line) and "# host:" not in line:
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "host round trips without a '# host:' reason:\n" + "\n".join(found)


def test_torch_compile_only_where_it_helps():
    """torch.compile appears in the modules that use it on purpose (documented there), nowhere else."""
    users = sorted(rel for rel, text in _sources() if "torch.compile(" in text)
    assert users == ["softmax/flex.py", "ssm/selective_scan.py"], users


# ------------------------------------------------------------------------------------- meta device

def _meta(*shape, dtype=torch.float32):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()


@pytest.mark.parametrize("mask", [None, "causal", "dense"])
@pytest.mark.parametrize("dv", [16, 24])
def test_sdpa_lse_cuda_path_on_meta(mask, dv):
    q, k, v = _meta(2, 4, 37, 16), _meta(2, 2, 45, 16), _meta(2, 2, 45, dv)
    spec = {"causal": M.Causal("top_left"), "dense": M.Dense(torch.ones(37, 45, dtype=torch.bool, device="meta")),
            None: None}[mask]
    assert sdpa.lse_supported(q.device, q.dtype) and not sdpa.lse_supported("cuda", torch.float64)
    out, lse = anyattn.attention(q, k, v, mask=spec, method="sdpa", return_lse=True)
    assert out.shape == (2, 4, 37, dv) and out.device.type == "meta"
    assert lse.shape == (2, 4, 37) and lse.dtype == torch.float32
    dq, dk, dv_ = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))  # the LSE's gradient folded in
    assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape


def test_auto_with_lse_uses_fused_kernel_off_cpu():
    q, k, v = _meta(1, 2, 64, 16), _meta(1, 2, 64, 16), _meta(1, 2, 64, 16)
    e = anyattn.explain(q, k, v, return_lse=True)
    assert e.method == "sdpa" and "memory-efficient kernel" in e.reason
    q64 = _meta(1, 2, 64, 16, dtype=torch.float64)
    assert anyattn.explain(q64, q64, q64, return_lse=True).method == "blocked"


@pytest.mark.parametrize("mask", [M.SlidingWindow(10, 3), M.Causal() & M.SlidingWindow(20), M.Causal()])
def test_blocked_engine_on_meta(mask):
    q, k, v = _meta(2, 4, 100, 16), _meta(2, 2, 130, 16), _meta(2, 2, 130, 8)
    out, lse = anyattn.attention(q, k, v, mask=mask, method="blocked", return_lse=True)
    grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    assert out.shape == (2, 4, 100, 8) and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_flex_refuses_other_devices():
    q = _meta(1, 2, 16, 8)
    with pytest.raises(ValueError, match="CUDA and CPU"):
        anyattn.attention(q, q, q, mask=M.SlidingWindow(2), method="flex")


def test_linear_engines_on_meta():
    t = lambda *s: _meta(*s)  # noqa: E731
    o = anyattn.linear.gated_delta_rule(t(1, 2, 64, 16), t(1, 2, 64, 16), t(1, 2, 64, 8), t(1, 2, 64), t(1, 2, 64),
                                         backend="anyattn")
    assert o.shape == (1, 2, 64, 8) and o.device.type == "meta"
    o = anyattn.linear.gla(t(1, 2, 64, 16), t(1, 2, 64, 16), t(1, 2, 64, 8), t(1, 2, 64, 16))
    assert o.shape == (1, 2, 64, 8)
