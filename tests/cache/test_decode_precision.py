"""Decoding in bf16 / fp16: every path (exact, split-K, prefill chunk, TokenSelect, PCA, int8) against the same
path run in float64 on the same (rounded) cache and queries. Bounds: relative Frobenius error of the output
<= 1e-2, LSE within 2e-2 absolute (docs/decoding.md lists the measured errors)."""
import pytest
import torch

from anyattn.cache import KVCache, TokenSelect, decode, fit_pca
from cache_helpers import rand

BOUND = 1e-2
NEEDLES = 8


def _direction(H_kv, D):
    u = rand((1, H_kv, 1, D), seed=3)
    return u / u.norm(dim=-1, keepdim=True)


def _caches(dtype, opts, lengths=(300, 170), H_kv=2, D=16):
    """The same rounded keys/values in a `dtype` cache and in a float64 cache."""
    B, L = len(lengths), max(lengths)
    k = rand((B, H_kv, L, D), seed=1)
    v = rand((B, H_kv, L, D), seed=2).to(dtype)
    # NEEDLES keys aligned with the queries: TokenSelect's top-k (k = NEEDLES) is the same in every precision
    k[:, :, 40:40 + NEEDLES] += 4 * _direction(H_kv, D)
    k = k.to(dtype)
    out = []
    for dt in (dtype, torch.float64):
        o = dict(opts)
        if "projection" in o:
            o["projection"] = o["projection"](dt)
        c = KVCache(B, H_kv, L, D, dtype=dt, **o)
        c.append(k.to(dt), v.to(dt), n_new=list(lengths))
        out.append(c)
    return out


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def _pca(dt):
    calib = rand((2, 2, 256, 16), seed=5)
    return fit_pca(calib.to(dt).to(torch.promote_types(dt, torch.float32)),
                   calib.to(dt).to(torch.promote_types(dt, torch.float32))).with_ranks(12)


PATHS = {
    "exact": ({}, {}),
    "split_k": ({}, {"num_splits": 3}),
    "tokenselect": ({"policy": TokenSelect(n_init=8, n_local=32, k=NEEDLES)}, {}),
    "pca": ({"compress": "pca", "projection": _pca}, {}),
    "int8": ({"quantize": "int8"}, {}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("T", [1, 5])
def test_low_precision_decode_against_float64(dtype, path, T):
    opts, call = PATHS[path]
    low, ref = _caches(dtype, opts)
    q = (3 * _direction(2, 16).repeat_interleave(2, 1) + 0.3 * rand((2, 4, T, 16), seed=4)).to(dtype)
    out, lse = decode(q, low, return_lse=True, **call)
    want, want_lse = decode(q.double(), ref, return_lse=True, **call)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out.float()).all()
    err = _rel(out, want)
    assert err <= BOUND, f"{path} {dtype}: relative error {err:.2e} > {BOUND}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert float((lse.double() - want_lse)[finite].abs().max()) <= 2e-2
