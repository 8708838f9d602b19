import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
import anyattn.approx  # noqa: F401
from anyattn.approx.sea import select_blocks
from anyattn.masks import Causal, Dense, KeyPadding, SlidingWindow

D64 = torch.float64


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D64)


def chosen_mask(sel, n_q, n_k, block_q, block_k):
    """Dense bool (B, H, N_q, N_k): query i may use key j iff j's block is chosen for i's query block."""
    B, H, nqb, _ = sel.shape
    nkb = -(-n_k // block_k)
    blocks = torch.zeros(B, H, nqb, nkb, dtype=torch.bool).scatter_(3, sel, True)
    qb = torch.arange(n_q) // block_q
    kb = torch.arange(n_k) // block_k
    return blocks[:, :, qb][:, :, :, kb]


def spec_dense(mask, B, H, n_q, n_k):
    return torch.ones(1, 1, n_q, n_k, dtype=torch.bool) if mask is None else mask.dense(B, H, n_q, n_k, None)


@pytest.mark.parametrize("mask", [None, Causal(), KeyPadding([30, 11]), Causal("top_left")])
@pytest.mark.parametrize("estimate", ["pooled", "linear"])
def test_matches_dense_formulation_with_the_chosen_blocks(mask, estimate):
    B, H, n_q, n_k, bq, bk = 2, 2, 27, 30, 8, 6
    q = rand(B, H, n_q, 8, seed=1).requires_grad_()
    k = rand(B, H, n_k, 8, seed=2).requires_grad_()
    v = rand(B, H, n_k, 5, seed=3).requires_grad_()
    opts = dict(block_q=bq, block_k=bk, budget=2, estimate=estimate, num_features=16, seed=4)
    out, lse = anyattn.attention(q, k, v, mask=mask, method="sea", return_lse=True, **opts)
    off = mask.offset(n_q, n_k) if isinstance(mask, Causal) else None
    lengths = mask.lengths if isinstance(mask, KeyPadding) else None
    sel = select_blocks(q, k, 8 ** -0.5, block_q=bq, block_k=bk, budget=2, estimate=estimate, num_features=16, seed=4,
                        causal_offset=off, lengths=lengths)
    allowed = chosen_mask(sel, n_q, n_k, bq, bk) & spec_dense(mask, B, H, n_q, n_k)
    ref, ref_lse = anyattn.attention(q, k, v, mask=Dense(allowed), method="reference", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = rand(B, H, n_q, 5, seed=6)
    ga = torch.autograd.grad((out * g).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if isinstance(mask, Causal):  # the diagonal blocks are always chosen: no query loses every key
        assert (allowed.any(-1) == spec_dense(mask, B, H, n_q, n_k).any(-1)).all()


@pytest.mark.parametrize("mask", [None, Causal(), KeyPadding([40, 3])])
def test_exact_when_budget_covers_every_block(mask):
    q, k, v = (rand(2, 2, 40, 8, seed=i).requires_grad_() for i in range(3))
    out = anyattn.attention(q, k, v, mask=mask, method="sea", block_q=16, block_k=8, budget=5)
    ref = anyattn.attention(q, k, v, mask=mask, method="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    ga = torch.autograd.grad(out.sum(), (q, k, v))
    gb = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_estimate_finds_the_heavy_block():
    # every query attends strongly to one planted key block
    base = rand(16, seed=0)
    base = 2 * base / base.norm()  # moderate norms: the FAVOR+ ('linear') estimate is reliable there
    q = base + rand(1, 1, 64, 16, scale=0.3, seed=1)
    k = rand(1, 1, 64, 16, scale=0.3, seed=2)
    k[:, :, 40:48] += 2 * base
    for est in ("pooled", "linear"):
        sel = select_blocks(q, k, 0.25, block_q=16, block_k=8, budget=1, estimate=est)
        assert (sel == 5).all()
    v = rand(1, 1, 64, 16, seed=3)
    e1 = anyattn.approx.error(q, k, v, "sea", block_q=16, block_k=8, budget=1).frobenius
    e4 = anyattn.approx.error(q, k, v, "sea", block_q=16, block_k=8, budget=4).frobenius
    assert e4 < e1


def test_deterministic_and_refusals():
    q, k, v = rand(1, 2, 50, 8, seed=1), rand(1, 1, 50, 8, seed=2), rand(1, 1, 50, 8, seed=3)
    a = anyattn.attention(q, k, v, method="sea", block_k=8, budget=2, estimate="linear", seed=1)
    assert torch.equal(a, anyattn.attention(q, k, v, method="sea", block_k=8, budget=2, estimate="linear", seed=1))
    with pytest.raises(ValueError, match="sea supports Causal and KeyPadding masks only, got mask SlidingWindow"):
        anyattn.attention(q, k, v, method="sea", mask=SlidingWindow(3))
    with pytest.raises(ValueError, match=r"estimate must be one of \['pooled', 'linear'\], got 'cnn'"):
        anyattn.attention(q, k, v, method="sea", estimate="cnn")
    with pytest.raises(ValueError, match="budget must be >= 1, got 0"):
        anyattn.attention(q, k, v, method="sea", budget=0)


@settings(deadline=None, max_examples=8)
@given(n_q=st.integers(1, 20), n_k=st.integers(1, 20), bq=st.integers(1, 6), bk=st.integers(1, 6),
       budget=st.integers(1, 4), causal=st.booleans())
def test_property_dense_formulation(n_q, n_k, bq, bk, budget, causal):
    q, k, v = rand(1, 1, n_q, 4, seed=1), rand(1, 1, n_k, 4, seed=2), rand(1, 1, n_k, 3, seed=3)
    mask = Causal() if causal else None
    out = anyattn.attention(q, k, v, mask=mask, method="sea", block_q=bq, block_k=bk, budget=budget)
    sel = select_blocks(q, k, 0.5, block_q=bq, block_k=bk, budget=budget,
                        causal_offset=mask.offset(n_q, n_k) if causal else None)
    allowed = chosen_mask(sel, n_q, n_k, bq, bk) & spec_dense(mask, 1, 1, n_q, n_k)
    ref = anyattn.attention(q, k, v, mask=Dense(allowed), method="reference")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
