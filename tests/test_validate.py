"""Bad input raises ValueError/TypeError naming the argument, the expected and the given values."""
import pytest
import torch

import anyattn
from anyattn import masks


def qkv(B=1, H=4, H_kv=2, N_q=5, N_k=6, D=8, D_v=8, dtype=torch.float32):
    return torch.randn(B, H, N_q, D, dtype=dtype), torch.randn(B, H_kv, N_k, D, dtype=dtype), \
        torch.randn(B, H_kv, N_k, D_v, dtype=dtype)


@pytest.mark.parametrize("make, exc, pattern", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dimensions, got shape \(4, 5, 8\)"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor, got ndarray"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q must have a floating dtype"),
    (lambda q, k, v: (q, k.double(), v), ValueError, "k must have q's dtype torch.float32, got torch.float64"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "v must have k's number of heads 2, got 1"),
    (lambda q, k, v: (q[:, :3], k, v), ValueError, r"q's heads \(3\) must be a multiple of k's heads \(H_kv = 2\)"),
    (lambda q, k, v: (q, k[..., :4], v), ValueError, "k must have q's head dim 8, got 4"),
    (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "v must have k's sequence length 6, got 3"),
    (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "k and v must have q's batch size 1, got k: 2, v: 2"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "non-empty sequence"),
])
def test_bad_tensors(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        anyattn.attention(*make(*qkv()))


def test_bad_device_message():
    q, k, v = qkv()
    meta = k.to("meta")
    with pytest.raises(ValueError, match="k must be on q's device cpu, got meta"):
        anyattn.attention(q, meta, v)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    ({"scale": float("nan")}, ValueError, "scale must be finite, got nan"),
    ({"scale": "x"}, TypeError, "scale must be a float or None, got str"),
    ({"method": "nope"}, ValueError, "method must be 'auto' or one of .* got 'nope'"),
    ({"mask": torch.ones(5, 7, dtype=torch.bool)}, ValueError, r"mask of shape \(1, 1, 5, 7\) does not broadcast to \(B, H, N_q, N_k\) = \(1, 4, 5, 6\)"),
    ({"mask": torch.full((5, 6), float("nan"))}, ValueError, "mask contains NaN"),
    ({"mask": torch.zeros(5, 6)}, TypeError, "mask must be a bool tensor"),
    ({"mask": 3}, TypeError, "mask must be None, an anyattn.masks spec"),
    ({"mask": masks.KeyPadding(torch.tensor([1, 2]))}, ValueError, r"KeyPadding lengths must have shape \(B,\) = \(1,\), got \(2,\)"),
    ({"mask": masks.KeyPadding(torch.tensor([9]))}, ValueError, r"KeyPadding lengths must lie in \[0, N_k = 6\]"),
    ({"mask": masks.Document(torch.zeros(4, dtype=torch.long))}, ValueError, "Document segment_ids must have shape"),
    ({"mask": masks.Causal(), "method": "sdpa", "return_lse": "yes"}, TypeError, "return_lse must be a bool"),
    ({"mask": masks.SlidingWindow(2), "method": "sdpa"}, ValueError, "method='sdpa' cannot run this request"),
    ({"method": "blocked", "block_q": 0}, ValueError, "block_q must be >= 1, got 0"),
    ({"method": "sdpa", "tolerance": 0.1}, ValueError, "tolerance= is only used by method='auto'"),
    ({"tolerance": -1.0}, ValueError, "tolerance must be a number >= 0"),
])
def test_bad_options(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        anyattn.attention(*qkv(), **kwargs)


def test_bad_mask_specs():
    with pytest.raises(ValueError, match="align must be 'bottom_right' or 'top_left', got 'middle'"):
        masks.Causal("middle")
    with pytest.raises(ValueError, match="SlidingWindow left must be an int >= 0, got -1"):
        masks.SlidingWindow(-1)
    with pytest.raises(TypeError, match="KeyPadding lengths must be an integer tensor"):
        masks.KeyPadding(torch.tensor([1.5]))
    with pytest.raises(TypeError, match="mask_mod must return a bool tensor"):
        anyattn.attention(*qkv(), mask=lambda b, h, q, k: q + k)
