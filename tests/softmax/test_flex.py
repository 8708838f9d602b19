"""Method `flex` (FlexAttention) against the float64 oracle for every mask and bias kind.

Without a GPU: FlexAttention's eager path (`compile=False`, any dtype, LSE and backward) checks each
spec's mask_mod / score_mod translation; the block tables are checked against the dense mask; two
compiled CPU runs (float32, forward: torch's CPU kernel is inference only) share their kernels.
With ANYATTN_TEST_DEVICE=cuda the compiled kernels are checked for outputs, LSE and gradients.
"""
import warnings

import pytest
import torch

import anyattn
from anyattn import biases as Bi
from anyattn import masks as M
from anyattn.softmax import flex
from anyattn.softmax.flex import block_tables
from helpers import assert_close, check_against_oracle, make_qkv, oracle

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # FlexAttention's eager-path warnings

B, H, H_KV, N, D, D_V = 2, 4, 2, 140, 8, 12
NB = 130  # bias cases: two query and key blocks of FlexAttention's 128


def mask_specs(n_q=N, n_k=N):
    """Every mask kind, on `n_q` x `n_k` problems (the Neighborhood grid has N = 140 points)."""
    g = torch.Generator().manual_seed(3)
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([30, 60, 1, 49]))
    return {
        "causal": M.Causal(),
        "causal_top_left": M.Causal("top_left"),
        "sliding_window": M.SlidingWindow(40, 5),
        "key_padding": M.KeyPadding(torch.tensor([100, 0])),  # batch 1: every row fully masked
        "document": M.Document(docs),
        "document_unsorted": M.Document(torch.randint(0, 3, (B, N), generator=g)),
        "dense": M.Dense(torch.rand(B, 1, n_q, n_k, generator=g) < 0.3),
        "neighborhood": M.Neighborhood((10, 14), (3, 5), dilation=(1, 2)),
        "mask_mod": M.MaskMod(lambda b, h, q, kv: (q + kv + h) % 3 != 0),
        "and": M.Causal() & M.KeyPadding(torch.tensor([140, 120])),
        "or": M.SlidingWindow(8) | M.Document(docs),
    }


def bias_specs():
    g = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {
        "alibi": (M.Causal(), Bi.Alibi.geometric(H, dtype=torch.float64)),
        "alibi_symmetric": (None, Bi.Alibi.geometric(H, dtype=torch.float64)),
        "t5": (None, Bi.RelativePosition.t5(r(16, H), True, 64)),
        "swin": (None, Bi.RelativePosition.swin(r(19 * 25, H), (10, 13))),
        "spatial": (None, Bi.SpatialDistance(r(NB, 3), r(H).abs())),
        "dense": (M.SlidingWindow(30, 30), Bi.Dense(r(B, H, NB, NB))),
        "factored": (None, Bi.Factored(r(H, NB, 3) * 0.3, r(B, 1, NB, 3) * 0.3)),
        "bias_mod": (None, Bi.BiasMod(lambda b, h, q, kv, w: w[h] * torch.cos((q - kv) * 0.1), (r(H),))),
        "sum": (M.Causal(), Bi.Alibi.geometric(H, dtype=torch.float64) + Bi.RelativePosition.t5(r(8, 1), False, 32)),
    }


def _shape(name):
    """Causal masks get N_q != N_k (bottom-right with N_q > N_k: the first rows see no key)."""
    return {"causal": (N, 100), "causal_top_left": (100, N)}.get(name, (N, N))


# ------------------------------------------------------------------ block tables (no compile)

@pytest.mark.parametrize("name", list(mask_specs()))
def test_block_tables_never_skip_an_allowed_key(name, device):
    n_q, n_k = _shape(name)
    spec = mask_specs(n_q, n_k)[name]
    spec.validate(B, H, n_q, n_k, device)
    blk = 16
    partial, full = block_tables(spec.tile_ranges(n_q, n_k, blk), n_q, n_k, blk)
    allowed = spec.dense(B, H, n_q, n_k, device).expand(B, H, n_q, n_k).cpu()
    for i in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            tile = allowed[:, :, i * blk:(i + 1) * blk, j * blk:(j + 1) * blk]
            if full[i, j]:
                assert tile.all(), f"{name}: block ({i}, {j}) marked full has masked entries"
            elif not partial[i, j]:
                assert not tile.any(), f"{name}: block ({i}, {j}) skipped has allowed entries"
    assert not (partial & full).any()
    if name in ("causal", "sliding_window", "neighborhood", "document"):
        assert (~partial & ~full).any(), f"{name}: tile ranges skipped no block"
    if name in ("causal", "sliding_window", "document"):
        assert full.any(), f"{name}: tile ranges marked no block full"


def test_block_mask_is_cached_across_equal_specs():
    a = flex.block_mask(M.SlidingWindow(7, 2), N, N, torch.device("cpu"))
    b = flex.block_mask(M.SlidingWindow(7, 2), N, N, torch.device("cpu"))
    assert a is b
    assert flex.block_mask(M.SlidingWindow(7, 3), N, N, torch.device("cpu")) is not a


# ------------------------------------------------------------------ eager path: every kind, float64

def _check_eager(q, k, v, **kw):
    """Outputs and LSE against the oracle; gradients too where FlexAttention has a backward (CUDA)."""
    if q.device.type == "cuda":
        return check_against_oracle("flex", q, k, v, compile=False, **kw)
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = anyattn.attention(q, k, v, method="flex", compile=False, return_lse=True, **kw)
    want, want_lse, _ = oracle(q, k, v, **kw)
    assert_close(out, want, q.dtype, "flex out")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "flex: -inf LSE rows differ"
    fin = torch.isfinite(want_lse)
    assert_close(lse[fin], want_lse[fin], q.dtype, "flex lse")


@pytest.mark.parametrize("name", list(mask_specs()))
def test_masks_eager_against_oracle(name):
    n_q, n_k = _shape(name)
    q, k, v = make_qkv(B, H, H_KV, n_q, n_k, D, D_V)
    _check_eager(q, k, v, mask=mask_specs(n_q, n_k)[name])


@pytest.mark.parametrize("name", list(bias_specs()))
def test_biases_eager_against_oracle(name):
    mask, bias = bias_specs()[name]
    q, k, v = make_qkv(B, H, H_KV, NB, NB, D, D_V, seed=1)
    _check_eager(q, k, v, mask=mask, bias=bias)


def test_eager_refuses_backward_on_cpu():
    q, k, v = make_qkv(1, 2, 2, 16, 16, 8, 8)
    if q.device.type != "cpu":
        pytest.skip("CPU-specific refusal")
    with pytest.raises(ValueError, match="no backward on CPU"):
        anyattn.attention(q, k, v, method="flex", compile=False)


def test_bias_parameter_gradients_eager(device):
    if device.type != "cuda":
        pytest.skip("FlexAttention has no backward on CPU")
    table = torch.randn(16, H, dtype=torch.float64, requires_grad=True)
    slopes = Bi.Alibi.geometric(H, dtype=torch.float64).slopes.requires_grad_()
    q, k, v = make_qkv(1, H, H, 150, 150, D, D)
    grads = []
    for method, kw in (("flex", {"compile": False}), ("reference", {})):
        bias = Bi.Alibi(slopes) + Bi.RelativePosition.t5(table, True, 64)
        out = anyattn.attention(q, k, v, mask=M.Causal(), bias=bias, method=method, **kw)
        grads.append(torch.autograd.grad(out.square().sum(), (slopes, table)))
    for got, want, what in zip(grads[0], grads[1], ("slopes", "table")):
        assert_close(got, want, torch.float64, f"d{what}")


# ------------------------------------------------------------------ compiled path

@pytest.mark.cpu_only
def test_compiled_cpu_forward():
    """One compiled kernel (compiling costs seconds on CPU; the eager tests above cover every kind's
    translation): causal & key padding with a fully masked batch, ALiBi + T5, grouped-query heads,
    D_v != D, N_q != N_k, float32."""
    table = torch.randn(16, H, generator=torch.Generator().manual_seed(0))
    mask = M.Causal() & M.KeyPadding(torch.tensor([120, 0]))
    bias = Bi.Alibi.geometric(H) + Bi.RelativePosition.t5(table, True, 64)
    q, k, v = (x.detach() for x in make_qkv(B, H, H_KV, 130, N, D, D_V, dtype=torch.float32, seed=10))
    with torch.no_grad():
        out = anyattn.attention(q, k, v, mask=mask, bias=bias, method="flex")
    want, lse, _ = oracle(q, k, v, mask=mask, bias=bias)
    assert_close(out, want, torch.float32, "compiled flex")
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all(), "fully masked rows must be 0"


@pytest.mark.cpu_only
def test_compiled_cpu_refuses_what_torch_cannot_do():
    q, k, v = make_qkv(1, 2, 2, 32, 32, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="no LSE"):
        anyattn.attention(q.detach(), k.detach(), v.detach(), mask=M.Causal(), method="flex", return_lse=True)
    with pytest.raises(ValueError, match="no backward"):
        anyattn.attention(q, k, v, mask=M.Causal(), method="flex")
    q64, k64, v64 = (x.detach().double() for x in (q, k, v))
    with pytest.raises(ValueError, match="float32/bf16/fp16"):
        anyattn.attention(q64, k64, v64, mask=M.Causal(), method="flex")
    with pytest.raises(TypeError, match="compile must be a bool"):
        anyattn.attention(q64, k64, v64, method="flex", compile="yes")


@pytest.mark.cpu_only
def test_auto_picks_flex_on_cpu_only_for_large_inference(monkeypatch):
    from anyattn import plan
    q, k, v = (x.detach() for x in make_qkv(1, 2, 2, 64, 64, 8, 8, dtype=torch.float32))
    e = anyattn.explain(q, k, v, mask=M.SlidingWindow(8))
    assert e.method == "blocked" and "does not repay compiling" in e.reason
    monkeypatch.setattr(plan, "CPU_FLEX_MIN_WORK", 1)
    assert anyattn.explain(q, k, v, mask=M.SlidingWindow(8)).method == "flex"
    e = anyattn.explain(q, k, v, mask=M.SlidingWindow(8), return_lse=True)
    assert e.method == "blocked" and "no LSE" in e.reason
    e = anyattn.explain(q.requires_grad_(), k, v, mask=M.SlidingWindow(8))
    assert e.method == "blocked" and "no backward" in e.reason
    monkeypatch.setenv("ANYATTN_NO_COMPILE", "1")
    assert anyattn.explain(q.detach(), k, v, mask=M.SlidingWindow(8)).method == "blocked"


@pytest.mark.cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(mask_specs()) + [f"bias:{n}" for n in bias_specs()])
def test_compiled_cuda_against_oracle(name, dtype):
    """Compiled FlexAttention on CUDA: outputs, LSE and q/k/v gradients against the float64 oracle."""
    if name.startswith("bias:"):
        mask, bias = bias_specs()[name[5:]]
        n_q, n_k = NB, NB
        bias = _cast_bias(bias, torch.float32)
    else:
        n_q, n_k = _shape(name)
        mask, bias = mask_specs(n_q, n_k)[name], None
    q, k, v = make_qkv(B, H, H_KV, n_q, n_k, 16, 32, dtype=dtype, seed=5)  # head dims Triton kernels take
    q, k, v = (x.detach().cuda().requires_grad_() for x in (q, k, v))
    mask, bias = _to(mask, "cuda"), _to(bias, "cuda")
    assert anyattn.explain(q, k, v, mask=mask, bias=bias, return_lse=True).method in ("flex", "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_against_oracle("flex", q, k, v, mask=mask, bias=bias)


def _cast_bias(bias, dtype):
    """float64 bias tensors -> dtype (FlexAttention kernels run in float32)."""
    for attr in ("slopes", "table", "coords", "weight", "bias", "u", "v"):
        if isinstance(getattr(bias, attr, None), torch.Tensor):
            setattr(bias, attr, getattr(bias, attr).to(dtype))
    for part in ("a", "b"):
        if hasattr(bias, part):
            _cast_bias(getattr(bias, part), dtype)
    if isinstance(bias, Bi.BiasMod):
        bias.params = tuple(p.to(dtype) for p in bias.params)
    return bias


def _to(spec, device):
    """Move the tensors of a spec to `device` (the specs above are built on the CPU)."""
    if spec is None:
        return None
    for attr, val in list(vars(spec).items()):
        if isinstance(val, torch.Tensor):
            setattr(spec, attr, val.to(device))
        elif isinstance(val, (M.Mask, Bi.Bias)):
            _to(val, device)
        elif isinstance(val, tuple) and val and all(isinstance(t, torch.Tensor) for t in val):
            setattr(spec, attr, tuple(t.to(device) for t in val))
    spec.__dict__.pop("_flex_block_masks", None)
    return spec
