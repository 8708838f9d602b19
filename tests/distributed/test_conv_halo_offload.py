"""`ad.causal_conv_halo` / `ad.causal_conv` (short causal convolutions over shards) and attention offloading
(`ad.partial_decode`, `ad.AttentionServer`, `ad.RemoteKVCache`) on thread-backed ranks."""
import pytest
import torch
import torch.nn.functional as F

import anyattn
import anyattn.distributed as ad
from anyattn.cache import KVCache
from anyattn.distributed.testing import run_threads

from cp_cases import conv_rank, decode_rank, generate_rank


def _conv_ref(x, w, k):
    """Depthwise causal conv of (B, N, C) with kernel (C, k), zero history."""
    xp = F.pad(x.transpose(1, 2), (k - 1, 0))
    return F.conv1d(xp, w[:, None], groups=x.shape[-1]).transpose(1, 2)


@pytest.mark.parametrize("kind", ["contiguous", "zigzag"])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_causal_conv_equals_single_process(kind, W, k):
    N = 8 * W
    g = torch.Generator().manual_seed(W * 10 + k)
    x = torch.randn(2, N, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, k, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, N, 3, generator=g, dtype=torch.float64)
    y = _conv_ref(x, w, k)
    dx, dw = torch.autograd.grad((y * dy).sum(), (x, w))
    res = run_threads(W, conv_rank, kind, x.detach(), w.detach(), dy, k)
    for yr, dxr, dwr in res:
        torch.testing.assert_close(yr, y.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dxr, dx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dwr, dw, rtol=1e-12, atol=1e-12)


def _halo_errors(comm, case):
    x = torch.zeros(1, case["n"], 2)
    return ad.causal_conv_halo(x, case["k"], layout=ad.Layout(case["kind"], comm.world_size, case["n"] * comm.world_size),
                               group=comm)


@pytest.mark.parametrize("case,match", [
    ({"kind": "stripe", "n": 4, "k": 3}, "contiguous' and 'zigzag"),
    ({"kind": "contiguous", "n": 2, "k": 4}, "exceed a neighbour's run"),
    ({"kind": "contiguous", "n": 4, "k": 0}, "kernel_size must be"),
])
def test_halo_errors(case, match):
    with pytest.raises(ValueError, match=match):
        run_threads(2, _halo_errors, case)


# --------------------------------------------------------------------------------------------- offloading
def test_partial_decode_merges_to_decode():
    g = torch.Generator().manual_seed(0)
    B, Hk, H, D, L = 2, 2, 4, 8, 20
    k, v = torch.randn(B, Hk, L, D, generator=g), torch.randn(B, Hk, L, D, generator=g)
    q = torch.randn(B, H, 3, D, generator=g)
    full = KVCache(B, Hk, L, D)
    full.append(k, v)
    want, want_lse = anyattn.decode(q, full, return_lse=True)
    got = anyattn.distributed.partial_decode(q, full)
    torch.testing.assert_close(got[0], want)
    # split the tokens in two shards by position parity: merged by LSE they give decode
    pos = torch.arange(L)
    parts = []
    for par in (0, 1):
        sel = pos[pos % 2 == par]
        c = KVCache(B, Hk, L, D)
        c.append(k[:, :, sel], v[:, :, sel])
        qp = torch.full((B, 3), L - 3) + torch.arange(3)
        parts.append(ad.partial_decode(q, c, q_positions=qp, key_positions=sel.expand(B, -1)))
    out, lse = anyattn.merge([p[0] for p in parts], [p[1] for p in parts])
    assert float((out - want).abs().max()) <= 1e-6
    assert float((lse - want_lse).abs().max()) <= 1e-5


@pytest.mark.parametrize("shard,W", [("heads", 2), ("heads", 3), ("sequence", 2), ("sequence", 4)])
@pytest.mark.parametrize("options", [{}, {"quantize": "int8"}], ids=["fp32", "int8"])
def test_remote_decode_equals_local(shard, W, options):
    errs = run_threads(W, decode_rank, shard, options)[0]
    assert max(errs) <= 1e-6, errs


@pytest.mark.parametrize("shard,W", [("heads", 3), ("sequence", 3)])
def test_generate_with_remote_caches(shard, W):
    assert run_threads(W, generate_rank, shard)[0] <= 1e-6


def _offload_errors(comm, case):
    if comm.rank != 0:
        return ad.AttentionServer(comm, shard="heads").serve()
    try:
        if case == "heads":
            ad.RemoteKVCache(0, 1, 3, 4, 8, group=comm, shard="heads")
        elif case == "empty":
            ad.RemoteKVCache(0, 1, 2, 4, 8, group=comm).decode(torch.zeros(1, 2, 1, 8))
        elif case == "server":       # layer 0 exists with B = 1: the servers' KVCache refuses B = 2, the client raises
            ad.RemoteKVCache(0, 1, 2, 4, 8, group=comm).append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
            ad.RemoteKVCache(0, 2, 2, 4, 8, group=comm).append(torch.zeros(2, 2, 1, 8), torch.zeros(2, 2, 1, 8))
        elif case == "lse":
            r = ad.RemoteKVCache(0, 1, 2, 4, 8, group=comm)
            r.append(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
            r.decode(torch.zeros(1, 2, 1, 8), return_lse=True)
    finally:
        ad.stop_servers(comm)


@pytest.mark.parametrize("case,err,match", [
    ("heads", ValueError, "divisible by the 2 servers"), ("empty", ValueError, "the cache is empty"),
    ("server", RuntimeError, "attention server rank 1: ValueError: k must have shape"),
    ("lse", ValueError, "needs shard='sequence'")])
def test_offload_errors(case, err, match):
    with pytest.raises(err, match=match):
        run_threads(3, _offload_errors, case)
