"""The public entry points: `attention()`, `explain()`, `methods()`. Validate -> plan -> run."""
from __future__ import annotations

from . import _builtin  # noqa: F401  (registers the engines)
from .biases import as_bias
from .masks import as_mask
from .plan import Explanation, choose
from .registry import Request, all_methods, get
from .validate import check_qkv, check_scale


def _request(q, k, v, mask, bias, scale, return_lse) -> Request:
    shape = check_qkv(q, k, v)
    scale = check_scale(scale, shape.D)
    mask = as_mask(mask)
    bias = as_bias(bias)
    if mask is not None:
        mask.validate(shape.B, shape.H, shape.N_q, shape.N_k, q.device)
    if bias is not None:
        bias.validate(shape.B, shape.H, shape.N_q, shape.N_k, q.device, q.dtype)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    return Request(q, k, v, mask, bias, scale, shape, return_lse)


def attention(q, k, v, *, mask=None, bias=None, scale=None, method="auto", return_lse=False, tolerance=None,
              **options):
    """Softmax attention `softmax(q k^T * scale + bias, masked) v`.

    q `(B, H, N_q, D)`, k `(B, H_kv, N_k, D)`, v `(B, H_kv, N_k, D_v)` with `H % H_kv == 0`.
    mask: None, an `anyattn.masks` spec, a bool tensor broadcastable to `(B, H, N_q, N_k)` (True =
        attend) or a `mask_mod(b, h, q_idx, kv_idx) -> bool` callable. Causal masks align bottom-right.
    bias: None, an `anyattn.biases` spec or a float tensor broadcastable to `(B, H, N_q, N_k)`; added
        to the scaled scores, unscaled.
    scale: multiplies `q k^T` (default `D ** -0.5`).
    method: "auto" or a name from `anyattn.methods()`; options go to the method (e.g. block sizes).
    tolerance: only with method="auto": the relative output error the caller accepts; without it
        auto picks exact methods only.
    Returns out `(B, H, N_q, D_v)`, or `(out, lse)` with lse `(B, H, N_q)` (natural log, float32 for
    low-precision inputs) when `return_lse`. A query row with no allowed key returns 0 and LSE -inf.
    """
    req = _request(q, k, v, mask, bias, scale, return_lse)
    if tolerance is not None and method != "auto":
        raise ValueError(f"tolerance= is only used by method='auto', got method={method!r}")
    name = choose(req, tolerance).method if method == "auto" else method
    m = get(name)
    if method != "auto":
        reason = m.supports(req)
        if reason is not None:
            raise ValueError(f"method={name!r} cannot run this request: {reason}")
    out, lse = m.run(req, **options)
    return (out, lse) if return_lse else out


def explain(q, k, v, *, mask=None, bias=None, scale=None, return_lse=False, tolerance=None) -> Explanation:
    """What `method="auto"` would pick for these inputs, and why."""
    return choose(_request(q, k, v, mask, bias, scale, return_lse), tolerance)


def methods() -> dict[str, str]:
    """Registered methods: name -> one-line summary (with "exact" or "approximate")."""
    return {name: f"{'exact' if m.exact else 'approximate'}: {m.summary}" for name, m in all_methods().items()}
