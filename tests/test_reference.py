"""The oracle against an independent float64 einsum formulation."""
import torch

import anyattn
from anyattn import masks


def einsum_attention(q, k, v, allowed, scale):
    G = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(G, 1)
    v = v.repeat_interleave(G, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdim=True), v)


def test_reference_matches_einsum():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 9, 8, dtype=torch.float64, generator=g)
    k = torch.randn(2, 2, 13, 8, dtype=torch.float64, generator=g)
    v = torch.randn(2, 2, 13, 5, dtype=torch.float64, generator=g)
    i = torch.arange(9).view(-1, 1)
    j = torch.arange(13).view(1, -1)
    allowed = j <= i + 4  # bottom-right causal for N_q=9, N_k=13
    out = anyattn.attention(q, k, v, mask=masks.Causal(), method="reference", scale=0.3)
    want = einsum_attention(q, k, v, allowed, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_reference_lse_is_logsumexp():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 6, 4, dtype=torch.float64, generator=g) for _ in range(3))
    _, lse = anyattn.attention(q, k, v, method="reference", return_lse=True)
    want = torch.logsumexp(q @ k.transpose(-1, -2) * 0.5, dim=-1)
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=1e-12)
