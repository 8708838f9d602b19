import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import anyattn
import anyattn.approx  # noqa: F401
from anyattn.approx.hyper import gray_rank, hyper_attention, make_plan, noncausal
from anyattn.masks import Causal, KeyPadding

D64 = torch.float64


def rand(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=D64)


def dense_hyper(q, k, v, scale, plan):
    """Dense formulation of one non-causal HyperAttention pass with the same plan: weights W_ab over
    sorted positions (1 inside the block diagonal, N_k/m per sample outside the query's block),
    out = softmax(S + log W) V, unsorted."""
    B, H, N_q, _ = q.shape
    N_k = k.shape[2]
    qs = torch.gather(q, 2, plan.q_order.unsqueeze(-1).expand_as(q))
    ks = torch.gather(k, 2, plan.k_order.unsqueeze(-1).expand_as(k))
    vs = torch.gather(v, 2, plan.k_order.unsqueeze(-1).expand(*plan.k_order.shape, v.shape[-1]))
    qb = torch.arange(N_q) // plan.block_q
    kb = torch.arange(N_k) // plan.block_k
    w = (qb.view(-1, 1) == kb.view(1, -1)).to(D64).expand(B, H, N_q, N_k).clone()
    if plan.nb > 1:
        for b in range(B):
            for h in range(H):
                for s in plan.samples[b, h].tolist():
                    w[b, h, qb != kb[s], s] += plan.weight
    s = scale * qs @ ks.transpose(-1, -2) + torch.log(w)
    out_s = torch.softmax(s, -1) @ vs
    lse_s = torch.logsumexp(s, -1)
    inv = torch.argsort(plan.q_order, -1)
    return torch.gather(out_s, 2, inv.unsqueeze(-1).expand_as(out_s)), torch.gather(lse_s, 2, inv)


def test_gray_code_rank_neighbours_differ_in_one_bit():
    r = 5
    rank = gray_rank(r)
    order = torch.argsort(rank)  # codes in Gray order
    diff = order[1:] ^ order[:-1]
    assert all(bin(int(d)).count("1") == 1 for d in diff)
    assert sorted(rank.tolist()) == list(range(1 << r))


@pytest.mark.parametrize("causal", [False, True])
def test_exact_when_one_block_covers_all_keys(causal):
    q, k, v = (rand(2, 3, 40, 8, seed=i).requires_grad_() for i in range(3))
    m = Causal() if causal else None
    out, lse = anyattn.attention(q, k, v, mask=m, method="hyper", block_size=40, min_seq_len=40, return_lse=True)
    ref, ref_lse = anyattn.attention(q, k, v, mask=m, method="reference", return_lse=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = rand(2, 3, 40, 8, seed=7)
    ga = torch.autograd.grad((out * g).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * g).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("n_q,n_k,block", [(32, 32, 8), (30, 45, 8), (17, 13, 4)])
def test_matches_dense_formulation_with_same_plan(n_q, n_k, block):
    q = rand(1, 2, n_q, 6, seed=1).requires_grad_()
    k = rand(1, 2, n_k, 6, seed=2).requires_grad_()
    v = rand(1, 2, n_k, 5, seed=3).requires_grad_()
    plan = make_plan(q, k, block, 6, 3, torch.Generator().manual_seed(4))
    out, lse = noncausal(q, k, v, 6 ** -0.5, plan)
    ref, ref_lse = dense_hyper(q, k, v, 6 ** -0.5, plan)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)
    g = rand(1, 2, n_q, 5, seed=8)
    ga = torch.autograd.grad((out * g).sum() + lse.sum(), (q, k, v))
    gb = torch.autograd.grad((ref * g).sum() + ref_lse.sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_run_uses_the_seeded_plan():
    q, k, v = rand(1, 2, 48, 8, seed=1), rand(1, 2, 48, 8, seed=2), rand(1, 2, 48, 8, seed=3)
    out = anyattn.attention(q, k, v, method="hyper", block_size=8, sample_size=8, lsh_num_projs=3, seed=11)
    plan = make_plan(q, k, 8, 8, 3, torch.Generator().manual_seed(11))
    ref, _ = dense_hyper(q, k, v, 8 ** -0.5, plan)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    again = anyattn.attention(q, k, v, method="hyper", block_size=8, sample_size=8, lsh_num_projs=3, seed=11)
    other = anyattn.attention(q, k, v, method="hyper", block_size=8, sample_size=8, lsh_num_projs=3, seed=12)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_causal_recursion_gradcheck_and_structure():
    q, k, v = (rand(1, 1, 16, 4, seed=i).requires_grad_() for i in range(3))
    opts = dict(block_size=4, sample_size=4, lsh_num_projs=2, min_seq_len=4, seed=3)

    def f(q, k, v):
        return hyper_attention(q, k, v, 0.5, causal=True, **opts)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)
    # causality: the output of query i does not depend on keys/values after i
    out = f(q, k, v)
    (gv,) = torch.autograd.grad(out[0, 0, 5].sum(), (v,))
    assert gv[0, 0, 6:].abs().max() == 0


def test_error_shrinks_with_larger_blocks_on_clustered_inputs():
    # keys in a few tight clusters, queries near them: LSH puts matching rows in the same blocks
    g = torch.Generator().manual_seed(0)
    centers = 3.0 * torch.randn(8, 32, generator=g, dtype=D64)
    idx = torch.randint(8, (1, 2, 512), generator=g)
    k = centers[idx] + 0.1 * torch.randn(1, 2, 512, 32, generator=g, dtype=D64)
    q = centers[torch.randint(8, (1, 2, 512), generator=g)] + 0.1 * torch.randn(1, 2, 512, 32, generator=g, dtype=D64)
    v = torch.randn(1, 2, 512, 32, generator=g, dtype=D64)
    e_small = anyattn.approx.error(q, k, v, "hyper", block_size=32, sample_size=32).frobenius
    e_big = anyattn.approx.error(q, k, v, "hyper", block_size=256, sample_size=64).frobenius
    assert e_big < e_small
    assert anyattn.approx.error(q, k, v, "hyper", block_size=512).frobenius < 1e-12


def test_refusals_and_bad_options():
    q = rand(1, 1, 8, 4)
    with pytest.raises(ValueError, match="hyper supports Causal masks only, got mask KeyPadding"):
        anyattn.attention(q, q, q, method="hyper", mask=KeyPadding([4]))
    with pytest.raises(ValueError, match="causal mask only with N_q == N_k, got N_q=4, N_k=8"):
        anyattn.attention(q[:, :, :4], q, q, method="hyper", mask=Causal())
    with pytest.raises(ValueError, match="lsh_num_projs must be <= 20"):
        anyattn.attention(q, q, q, method="hyper", lsh_num_projs=21)
    with pytest.raises(ValueError, match="block_size must be >= 1, got 0"):
        anyattn.attention(q, q, q, method="hyper", block_size=0)


@settings(deadline=None, max_examples=8)
@given(n_q=st.integers(1, 20), n_k=st.integers(1, 20), block=st.integers(1, 8), groups=st.sampled_from([1, 2]))
def test_property_plan_matches_dense(n_q, n_k, block, groups):
    q, k, v = rand(1, 2, n_q, 4, seed=1), rand(1, 2 // groups, n_k, 4, seed=2), rand(1, 2 // groups, n_k, 3, seed=3)
    out = anyattn.attention(q, k, v, method="hyper", block_size=block, sample_size=3, lsh_num_projs=2, seed=1)
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    plan = make_plan(q, kk, block, 3, 2, torch.Generator().manual_seed(1))
    ref, _ = dense_hyper(q, kk, vv, 0.5, plan)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    assert math.isfinite(float(out.abs().sum()))
