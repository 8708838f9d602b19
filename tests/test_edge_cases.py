"""Named edge cases: fully masked rows, length 1, huge logits."""
import pytest
import torch

import anyattn
from anyattn import masks
from helpers import check_against_oracle, make_qkv

EXACT = ["reference", "blocked", "sdpa", "auto"]


@pytest.mark.parametrize("method", EXACT)
def test_fully_masked_rows_return_zero_with_neg_inf_lse_and_zero_grads(method):
    q, k, v = make_qkv(1, 2, 2, 6, 6, 4, 4)
    dense = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    dense[..., 2, :] = False  # query 2 sees nothing
    out, lse = anyattn.attention(q, k, v, mask=dense, method=method, return_lse=True)
    assert torch.all(out[:, :, 2] == 0)
    assert torch.all(lse[:, :, 2] == float("-inf"))
    assert torch.isfinite(out).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert torch.all(q.grad[:, :, 2] == 0)


@pytest.mark.parametrize("method", ["blocked", "auto", "reference"])
def test_key_padding_zero_length_sequence(method):
    q, k, v = make_qkv(2, 2, 1, 5, 7, 4, 4)
    check_against_oracle(method, q, k, v, mask=masks.KeyPadding(torch.tensor([0, 7])))
    out = anyattn.attention(q, k, v, mask=masks.KeyPadding(torch.tensor([0, 7])), method=method)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("method", ["blocked", "sdpa"])
def test_bottom_right_causal_with_more_queries_than_keys(method):
    # N_q > N_k: the first N_q - N_k queries sit before every key and see nothing.
    q, k, v = make_qkv(1, 2, 2, 9, 4, 4, 4)
    check_against_oracle(method, q, k, v, mask=masks.Causal())
    _, lse = anyattn.attention(q, k, v, mask=masks.Causal(), method=method, return_lse=True)
    assert torch.all(lse[..., :5] == float("-inf")) and torch.isfinite(lse[..., 5:]).all()


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits_stay_finite(method, dtype):
    # Logits around 1e4: a naive exp overflows; online softmax must not.
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8, dtype=dtype, scale_logits=3e3)
    # In float32 the logits themselves carry ~1e4 * 6e-8 absolute error, so compare at that level.
    tol = None if dtype == torch.float64 else (5e-3, 5e-3)
    check_against_oracle(method, q, k, v, tol=tol, mask=masks.Causal())


@pytest.mark.parametrize("method", EXACT)
def test_length_one(method):
    q, k, v = make_qkv(1, 1, 1, 1, 1, 1, 1)
    out = anyattn.attention(q, k, v, method=method)
    torch.testing.assert_close(out, v.detach().expand_as(out))
    check_against_oracle(method, q, k, v)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_steep_bias_with_masks_is_exact(dtype):
    """A bias that spreads scores hundreds below the row max takes blocked's clamped-exp path;
    masked entries and empty rows must still be exactly 0."""
    q, k, v = make_qkv(2, 2, 2, 19, 23, 4, 4, dtype=dtype)
    pos = torch.arange(23, dtype=dtype)
    bias = (-40.0 * (pos[4:].view(-1, 1) - pos.view(1, -1)).abs()).view(1, 1, 19, 23)
    mask = masks.KeyPadding(torch.tensor([0, 17])) & masks.SlidingWindow(2, 2)  # sequence 0: empty rows
    check_against_oracle("blocked", q, k, v, mask=mask, bias=bias, block_q=8, block_k=8)
