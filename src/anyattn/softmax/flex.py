"""Method `flex`: anyattn's mask and bias specs on torch's FlexAttention (Dong et al. 2024, "Flex
Attention: A Programming Model for Generating Optimized Attention Kernels", arXiv:2412.05496).

Translation (nothing quadratic is built):
- a mask spec becomes the `mask_mod` `(b, h, q_idx, kv_idx) -> spec.allowed(...)` and a `BlockMask`
  whose partial and full key blocks come from `spec.tile_ranges(N_q, N_k, 128)` (block level only:
  `ceil(N_q/128) x ceil(N_k/128)` booleans, never an `N_q x N_k` evaluation). Spans hold for every
  batch and head, so one block row serves all of them. A `mask_mod` callable has no tile ranges: all
  its blocks are partial (combine it with a spec, e.g. `Causal() & fn`, to skip blocks);
- a bias spec becomes the `score_mod` `score + bias.bias_mod(N_q, N_k)(b, h, q_idx, kv_idx)`; its
  tensors are captured, so FlexAttention's backward returns their gradients (CUDA).

`flex_attention` is compiled once (`torch.compile(..., dynamic=False)`); torch's compile cache then
holds one kernel per shape, dtype and spec kind (a spec's integer parameters are constants of its
kernel). Block masks are cached on the spec object, and for specs without tensors (Causal,
SlidingWindow, Neighborhood and their combinations) across spec objects.

Devices (torch 2.13; see docs/gpu.md):
- CUDA: forward and backward in FlexAttention's Triton kernels, the LSE (always requested: rows whose
  keys are all masked get output 0 and LSE -inf from it), grouped-query heads (`enable_gqa`),
  `D_v != D`, gradients to bias tensors.
- CPU: torch's compiled CPU kernel is inference only: no LSE, no backward, float32/bf16/fp16. `flex`
  therefore refuses `return_lse=True`, inputs that require grad (use `blocked`, the CPU training path)
  and float64 on CPU, saying so; `auto` uses it on CPU only for large inference calls (see `plan.py`).
  Fully masked rows get output 0 from the CPU kernel.
- `compile=False` runs FlexAttention's eager path: it materializes the scores (quadratic memory), but
  returns the LSE on every device and takes float64 (backward: CUDA only); for tests and debugging.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import torch

from ..lse import NEG_INF
from ..masks import And, Causal, Neighborhood, Or, SlidingWindow
from ..registry import Method, Request, register

BLOCK = 128  # FlexAttention's sparse block size (queries and keys)
RECOMPILE_LIMIT = 64  # torch's default (8) is shared by every shape and spec kind of one compiled function
FLEX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SHARED_CACHE: OrderedDict = OrderedDict()  # block masks of tensor-free specs, by their parameters
_SHARED_CACHE_SIZE = 64


def available() -> str | None:
    """None if FlexAttention can be imported here, else why not."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # pragma: no cover - torch without FlexAttention
        return f"FlexAttention is not importable from this torch ({torch.__version__}): {e}"
    return None


@lru_cache(maxsize=None)
def compiled_flex_attention():
    """`torch.compile(flex_attention)`, one per process (method `flex` and the bench peers share it)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def _spec_key(mask):
    """A hashable key of a spec that holds no tensors (its parameters), else None."""
    if isinstance(mask, Causal):
        return ("Causal", mask.align)
    if isinstance(mask, SlidingWindow):
        return ("SlidingWindow", mask.left, mask.right, mask.align)
    if isinstance(mask, Neighborhood):
        return ("Neighborhood", mask.shape, mask.kernel_size, mask.dilation, mask.stride, mask.is_causal)
    if isinstance(mask, (And, Or)):
        a, b = _spec_key(mask.a), _spec_key(mask.b)
        return None if a is None or b is None else (type(mask).__name__, a, b)
    return None


def block_tables(spans, n_q: int, n_k: int, block: int = BLOCK):
    """Per query block, which key blocks are partial (masked inside) and which are full, from the spec's
    tile ranges `spans` (one `Span` per query block of `block` rows). Returns bool `(partial, full)`,
    each `(ceil(n_q / block), ceil(n_k / block))`. A key block is full when every key in it lies in the
    span's full range, partial when it meets `[lo, hi)` otherwise, skipped when it does not meet it."""
    s = torch.tensor([tuple(sp) for sp in spans], dtype=torch.long).view(-1, 4)  # host: block tables
    lo, hi, flo, fhi = (c.view(-1, 1) for c in s.unbind(1))
    start = torch.arange(0, n_k, block).view(1, -1)  # host: block tables
    end = torch.clamp(start + block, max=n_k)
    touch = (start < hi) & (end > lo)
    full = (start >= flo) & (end <= fhi) & (fhi > flo)
    return touch & ~full, full


def _pack(m: torch.Tensor, device):
    """`(T, K)` bool -> FlexAttention's `(1, 1, T)` counts and `(1, 1, T, K)` indices (int32)."""
    count = m.sum(1, dtype=torch.int32)
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return count.view(1, 1, -1).to(device), order.view(1, 1, *m.shape).to(device)


def block_mask(mask, n_q: int, n_k: int, device):
    """The `BlockMask` of a mask spec (see the module docstring), cached."""
    from torch.nn.attention.flex_attention import BlockMask
    key = (n_q, n_k, str(device))
    own = mask.__dict__.setdefault("_flex_block_masks", {})
    if key in own:
        return own[key]
    shared = _spec_key(mask)
    if shared is not None and (shared, key) in _SHARED_CACHE:
        _SHARED_CACHE.move_to_end((shared, key))
        own[key] = _SHARED_CACHE[(shared, key)]
        return own[key]
    partial, full = block_tables(mask.tile_ranges(n_q, n_k, BLOCK), n_q, n_k)
    kv_num, kv_idx = _pack(partial, device)
    full_num, full_idx = _pack(full, device)

    def mask_mod(b, h, q_idx, kv_idx):
        return mask.allowed(b, h, q_idx, kv_idx, n_q, n_k)

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=mask_mod,
                                  seq_lengths=(n_q, n_k))
    own[key] = bm
    if shared is not None:
        _SHARED_CACHE[(shared, key)] = bm
        while len(_SHARED_CACHE) > _SHARED_CACHE_SIZE:
            _SHARED_CACHE.popitem(last=False)
    return bm


def score_mod_of(bias, n_q: int, n_k: int):
    """FlexAttention `score_mod` adding a bias spec (None for no bias)."""
    if bias is None:
        return None
    mod = bias.bias_mod(n_q, n_k)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + mod(b, h, q_idx, kv_idx).to(score.dtype)
    return score_mod


def _wants_grad(req: Request) -> bool:
    ts = [req.q, req.k, req.v] + (list(req.bias.tensors()) if req.bias is not None else [])
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def _supports(req: Request):
    """What every `flex` call needs (the compiled path needs more: see `compiled_supports`)."""
    why = available()
    if why is None and req.q.device.type not in ("cuda", "cpu"):
        why = f"FlexAttention runs on CUDA and CPU, got device {req.q.device.type!r}"
    return why


def compiled_supports(req: Request):
    """None if the compiled path (the default, and what `auto` uses) can run `req`, else why not."""
    why = _supports(req)
    if why is not None:
        return why
    if req.q.dtype not in FLEX_DTYPES:
        return f"FlexAttention's kernels take float32/bf16/fp16, got {req.q.dtype} (use 'blocked' for float64)"
    if req.q.device.type == "cpu":
        if req.return_lse:
            return "FlexAttention's compiled CPU kernel returns no LSE (torch: CPU is inference only)"
        if _wants_grad(req):
            return ("FlexAttention's compiled CPU kernel has no backward (torch: CPU is inference only); "
                    "'blocked' is the CPU training path")
    return None


def flex_attention(q, k, v, mask, bias, scale: float, shape, return_lse: bool, compile: bool = True):
    """Attention through FlexAttention. q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)`;
    mask, bias: anyattn specs or None. Returns out `(B, H, N_q, D_v)` and lse `(B, H, N_q)` (float32)
    or None. `compile=False`: FlexAttention's eager (quadratic-memory) path."""
    from torch.nn.attention import flex_attention as fa
    n_q, n_k = shape.N_q, shape.N_k
    bm = block_mask(mask, n_q, n_k, q.device) if mask is not None else None
    fn = compiled_flex_attention() if compile else fa.flex_attention
    want_lse = return_lse or q.device.type != "cpu" or not compile
    kwargs = dict(score_mod=score_mod_of(bias, n_q, n_k), block_mask=bm, scale=scale,
                  enable_gqa=shape.H != shape.H_kv)
    if want_lse:
        kwargs.update({"return_aux": fa.AuxRequest(lse=True)} if hasattr(fa, "AuxRequest") else {"return_lse": True})
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        res = fn(q, k, v, **kwargs)
    if not want_lse:
        return res, None
    out, aux = res
    lse = aux.lse if hasattr(aux, "lse") else aux
    empty = lse == NEG_INF
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, (lse if return_lse else None)


def _run(req: Request, compile: bool = True):
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
    reason = compiled_supports(req) if compile else _supports(req)
    if reason is None and not compile and req.q.device.type == "cpu" and _wants_grad(req):
        reason = "FlexAttention has no backward on CPU (eager or compiled); 'blocked' is the CPU training path"
    if reason is not None:
        raise ValueError(f"method='flex' cannot run this request: {reason}")
    return flex_attention(req.q, req.k, req.v, req.mask, req.bias, req.scale, req.shape, req.return_lse, compile)


register(Method("flex", True, "torch FlexAttention (compiled): every mask/bias spec as mask_mod/score_mod with a "
                "block mask from the spec's tile ranges; CUDA: forward+backward+LSE; CPU: forward only",
                _supports, _run,
                {"compile": "False runs FlexAttention's eager path (quadratic memory; LSE on every device, "
                            "float64; for tests)"}))
