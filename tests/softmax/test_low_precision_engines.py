"""bf16 / fp16 in the blocked engine and neighborhood attention: the matmuls run in bf16 (spied), statistics
and LSE in fp32, outputs in the input dtype; outputs and every gradient within a relative Frobenius error of
1e-2 of float64 on the same rounded inputs (measured 3-7e-3, docs/softmax.md and docs/neighborhood.md)."""
import pytest
import torch

import anyattn
from anyattn.softmax.neighborhood import neighborhood

BOUND = 1e-2


def _rel(a, b):
    return float((a.detach().double() - b.detach()).norm() / b.detach().norm())


def _against_float64(fn, shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = [torch.randn(*s, generator=g) for s in shapes]
    low = [t.to(dtype).requires_grad_() for t in base]
    wide = [t.to(dtype).double().requires_grad_() for t in base]
    out, ref = fn(*low), fn(*wide)
    assert out.dtype == dtype
    cot = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * cot).sum(), low)
    want = torch.autograd.grad((ref * cot).sum(), wide)
    errs = [_rel(out, ref)] + [_rel(a, b) for a, b in zip(grads, want)]
    for name, e in zip(("out", "dq", "dk", "dv"), errs):
        assert e <= BOUND, f"{name}: relative error {e:.2e} > {BOUND}"
    for a in grads:
        assert a.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["none", "causal", "alibi", "gqa_padding"])
def test_blocked_low_precision(dtype, case):
    from anyattn import biases, masks
    H_kv = 2 if case == "gqa_padding" else 4
    mask = {"none": None, "causal": masks.Causal(), "alibi": masks.Causal(),
            "gqa_padding": masks.KeyPadding(torch.tensor([150, 77]))}[case]
    bias = biases.Alibi.geometric(4) if case == "alibi" else None

    def fn(q, k, v):
        return anyattn.attention(q, k, v, mask=mask, bias=bias, method="blocked", block_q=32, block_k=64)
    _against_float64(fn, [(2, 4, 150, 32), (2, H_kv, 150, 32), (2, H_kv, 150, 32)], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,ks,ds,cs", [
    ((300,), 33, 1, False), ((200,), 17, 3, True), ((24, 20), (7, 5), (1, 2), (False, True)),
    ((6, 10, 12), (3, 5, 5), 1, False),
])
def test_neighborhood_low_precision(dtype, shape, ks, ds, cs):
    def fn(q, k, v):
        return neighborhood(q, k, v, ks, ds, 1, cs)
    _against_float64(fn, [(1, 4, *shape, 32), (1, 2, *shape, 32), (1, 2, *shape, 32)], dtype)


def test_engines_multiply_in_bf16_and_keep_statistics_in_fp32(monkeypatch):
    """Every matmul / bmm operand of the blocked engine and of the halo engine is bf16 for bf16 inputs;
    the LSE comes back in fp32."""
    seen = set()
    for fname in ("matmul", "bmm", "baddbmm"):
        real = getattr(torch, fname)

        def spy(*args, _real=real, **kw):
            seen.update(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2)
            return _real(*args, **kw)
        monkeypatch.setattr(torch, fname, spy)
    q, k, v = (torch.randn(1, 2, 96, 16).bfloat16().requires_grad_() for _ in range(3))
    out, lse = anyattn.attention(q, k, v, mask=anyattn.masks.Causal(), method="blocked", return_lse=True,
                                 block_q=32, block_k=32)
    out.float().sum().backward()
    assert lse.dtype == torch.float32
    o2, l2 = neighborhood(q, k, v, 9, return_lse=True)
    (o2.float().sum() + l2.sum()).backward()
    assert l2.dtype == torch.float32
    # baddbmm's first operand is the additive mask (matmul dtype too)
    assert seen == {torch.bfloat16}, seen
