"""blocked, sdpa and auto against the float64 oracle: outputs, LSE and gradients of q, k, v."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import anyattn
from anyattn import masks
from helpers import TOL, check_against_oracle, make_qkv


def mask_zoo(B, N_q, N_k, draw_seed=0):
    g = torch.Generator().manual_seed(draw_seed)
    seg = torch.sort(torch.randint(0, 3, (B, N_k), generator=g), dim=1).values
    return {
        "none": None,
        "causal": masks.Causal(),
        "causal_top_left": masks.Causal("top_left"),
        "sliding": masks.SlidingWindow(3, 1),
        "padding": masks.KeyPadding(torch.randint(0, N_k + 1, (B,), generator=g)),
        "document": masks.Document(seg) if N_q == N_k else masks.Document(seg[:, -N_q:], seg),
        "dense": masks.Dense(torch.rand(B, 1, N_q, N_k, generator=g) > 0.4),
        "mask_mod": lambda b, h, qi, kj: ((qi + kj + h) % 3) != 0,
        "causal&window": masks.Causal() & masks.SlidingWindow(2, 0),
        "window|padding": masks.SlidingWindow(1, 1) | masks.KeyPadding(torch.full((B,), min(2, N_k))),
    }


MASKS = list(mask_zoo(1, 4, 4))


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("method", ["blocked", "sdpa", "auto"])
def test_engines_match_oracle_float64(method, mask_name):
    B, H, H_kv, N_q, N_k, D, D_v = 2, 4, 2, 23, 37, 8, 6
    q, k, v = make_qkv(B, H, H_kv, N_q, N_k, D, D_v)
    mask = mask_zoo(B, N_q, N_k)[mask_name]
    opts = {"block_q": 8, "block_k": 16} if method == "blocked" else {}
    if method == "sdpa":
        req_ok = mask is None or isinstance(mask, (masks.Causal, masks.Dense))
        if not req_ok:
            with pytest.raises(ValueError, match="method='sdpa' cannot run"):
                anyattn.attention(q, k, v, mask=mask, method="sdpa")
            return
    check_against_oracle(method, q, k, v, mask=mask, **opts)


@given(
    B=st.integers(1, 2), H_kv=st.integers(1, 2), groups=st.sampled_from([1, 2, 3]),
    N_q=st.integers(1, 40), N_k=st.integers(1, 40), D=st.sampled_from([1, 4, 8]), D_v=st.sampled_from([2, 8]),
    mask_name=st.sampled_from(MASKS), block_q=st.sampled_from([4, 16, 64]), block_k=st.sampled_from([3, 16, 64]),
    contiguous=st.booleans(), seed=st.integers(0, 1000),
)
def test_blocked_property(B, H_kv, groups, N_q, N_k, D, D_v, mask_name, block_q, block_k, contiguous, seed):
    q, k, v = make_qkv(B, H_kv * groups, H_kv, N_q, N_k, D, D_v, seed=seed, contiguous=contiguous)
    mask = mask_zoo(B, N_q, N_k, seed)[mask_name]
    check_against_oracle("blocked", q, k, v, mask=mask, block_q=block_q, block_k=block_k)


@given(
    H_kv=st.integers(1, 2), groups=st.sampled_from([1, 2]), N_q=st.integers(1, 33), N_k=st.integers(1, 33),
    D=st.sampled_from([4, 8]), D_v=st.sampled_from([4, 6]), mask_name=st.sampled_from(["none", "causal", "causal_top_left", "dense"]),
    seed=st.integers(0, 1000),
)
def test_sdpa_property(H_kv, groups, N_q, N_k, D, D_v, mask_name, seed):
    q, k, v = make_qkv(1, H_kv * groups, H_kv, N_q, N_k, D, D_v, seed=seed)
    check_against_oracle("sdpa", q, k, v, mask=mask_zoo(1, N_q, N_k, seed)[mask_name])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["blocked", "sdpa"])
@pytest.mark.parametrize("mask_name", ["none", "causal", "padding"])
def test_low_precision(dtype, method, mask_name):
    if method == "sdpa" and mask_name == "padding":
        pytest.skip("KeyPadding has no SDPA form")
    q, k, v = make_qkv(2, 4, 2, 19, 45, 16, 16, dtype=dtype)
    mask = mask_zoo(2, 19, 45)[mask_name]
    opts = {"block_q": 8, "block_k": 16} if method == "blocked" else {}
    # fp16 inputs run bf16 matmuls on CPU (anyattn.precision): bf16-sized errors.
    tol = TOL[torch.bfloat16] if method == "blocked" and dtype == torch.float16 else None
    check_against_oracle(method, q, k, v, mask=mask, tol=tol, **opts)


@pytest.mark.parametrize("method", ["blocked", "sdpa", "auto"])
def test_single_query_decoding_shape(method):
    q, k, v = make_qkv(2, 8, 2, 1, 50, 16, 16)
    check_against_oracle(method, q, k, v, mask=masks.Causal())


def test_blocked_skips_masked_tiles():
    """Tiles outside a causal span are never computed: fewer score matmuls than the full grid."""
    q, k, v = make_qkv(1, 1, 1, 64, 64, 4, 4)
    calls = {"n": 0}
    real = masks.Causal.tile

    def counting_tile(self, *args):
        calls["n"] += 1
        return real(self, *args)

    masks.Causal.tile = counting_tile
    try:
        anyattn.attention(q, k, v, mask=masks.Causal(), method="blocked", block_q=16, block_k=16)
    finally:
        masks.Causal.tile = real
    # 4 query tiles; each masks only its diagonal tile; tiles above the diagonal are skipped.
    assert calls["n"] == 4
    spans = masks.Causal().tile_ranges(64, 64, 16)
    assert [s.hi for s in spans] == [16, 32, 48, 64]
    assert [s.full_hi for s in spans] == [1, 17, 33, 49]


def test_blocked_never_materializes_scores():
    """No tensor of N_q x N_k (per head) elements is allocated in forward or backward."""
    N = 256
    q, k, v = make_qkv(1, 2, 2, N, N, 8, 8, dtype=torch.float32)
    biggest = {"n": 0}

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    biggest["n"] = max(biggest["n"], t.numel())
            return out

    with Spy():
        out = anyattn.attention(q, k, v, mask=masks.Causal(), method="blocked", block_q=32, block_k=64)
        out.sum().backward()
    assert biggest["n"] < N * N  # tiles are 2 x 32 x 64 = 4096 elements; N*N = 65536
