"""`BlockMask` / `BlockBias` / `Bias.at`: every mask and bias kind on contiguous and strided sub-blocks
equals the global spec indexed at those positions; tile ranges stay valid; bias gradients match."""
import pytest
import torch
from hypothesis import given, strategies as st

from anyattn.subblock import BlockBias, BlockMask, GlobalSpans, Run
from spec_zoo import BIASES, MASKS, make_bias, make_mask

B, H, N = 2, 3, 24


def _runs(draw_start, count, step):
    return Run(draw_start, count, step)


run_st = st.tuples(st.integers(1, 3), st.integers(1, 8)).flatmap(
    lambda sc: st.tuples(st.integers(0, N - 1 - (sc[1] - 1) * sc[0]), st.just(sc[1]), st.just(sc[0])))


def _pos(r: Run):
    return torch.arange(r.start, r.start + r.step * r.count, r.step)


@given(kind=st.sampled_from(MASKS[1:]), q=run_st, k=run_st, heads=st.sampled_from([(0, 3), (1, 2), (2, 3)]),
       block=st.sampled_from([1, 2, 3, 8]))
def test_block_mask_equals_global_mask_at_positions(kind, q, k, heads, block):
    q, k = Run(*q), Run(*k)
    mask = make_mask(kind, B, H, N)
    mask.validate(B, H, N, N, torch.device("cpu"))
    want = mask.dense(B, H, N, N, None).expand(B, H, N, N)[:, heads[0]:heads[1]][:, :, _pos(q)][:, :, :, _pos(k)]
    bm = BlockMask(mask, q, k, B, H, N, N, heads, GlobalSpans(mask, N, N, block))
    got = bm.dense(B, heads[1] - heads[0], q.count, k.count, None).expand_as(want)
    assert torch.equal(got, want)
    for t0, span in zip(range(0, q.count, 2), bm.tile_ranges(q.count, k.count, 2)):
        rows = want[:, :, t0:t0 + 2]
        outside = torch.ones(k.count, dtype=torch.bool)
        outside[span.lo:span.hi] = False
        assert not rows[..., outside].any(), (span, kind)
        assert rows[..., span.full_lo:span.full_hi].all(), (span, kind)


@pytest.mark.parametrize("kind", BIASES[1:])
@pytest.mark.parametrize("q,k,heads", [(Run(5, 7, 1), Run(0, 9, 1), (0, 3)), (Run(1, 6, 3), Run(2, 5, 4), (1, 3)),
                                       (Run(20, 4, 1), Run(3, 6, 2), (2, 3))])
def test_block_bias_equals_global_bias_with_gradients(kind, q, k, heads):
    bias = make_bias(kind, B, H, N)
    bias.validate(B, H, N, N, torch.device("cpu"), torch.float64)
    full = bias.dense(N, N)
    full = full.reshape((1,) * (4 - full.dim()) + tuple(full.shape)).expand(B, H, N, N)
    want = full[:, heads[0]:heads[1]][:, :, _pos(q)][:, :, :, _pos(k)]
    bb = BlockBias(bias, q, k, B, H, N, N, heads)
    ts = bias.tensors()
    got = bb.tile(ts, 0, q.count, 0, k.count, q.count, k.count).expand_as(want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    g_got = torch.autograd.grad((got * w).sum(), ts, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), ts, allow_unused=True)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    # the base-class default (bounding box + gather) agrees with the specs' own formula
    qi, ki = _pos(q).view(1, 1, -1, 1), _pos(k).view(1, 1, 1, -1)
    b_idx, h_idx = torch.arange(B).view(-1, 1, 1, 1), torch.arange(*heads).view(1, -1, 1, 1)
    default = type(bias).__mro__[-2].at(bias, ts, b_idx, h_idx, qi, ki, N, N)
    torch.testing.assert_close(default.expand_as(want), want, rtol=1e-12, atol=1e-12)
