"""Run Hugging Face transformers models on anyattn: `attn_implementation="anyattn"`.

    import anyattn.integrations.transformers as at
    at.register(method="hyper", block_size=64)           # or at.register() and at.use_method(...)
    model = AutoModel.from_pretrained(path, attn_implementation="anyattn")
    with at.using("performer", num_features=128):        # temporarily another method
        model(**batch)

`register()` adds the key "anyattn" to transformers' `AttentionInterface` (the attention function)
and to `AttentionMaskInterface` (so models build SDPA-style boolean masks for it; without a mask
function transformers would silently drop padding masks for an unknown implementation). The method
and its options come from the module setting (`use_method` / `using` / `register(method=...)`) or,
per call, from the kwargs `anyattn_method=` / `anyattn_options=` that a model forwards to attention.

Masks: transformers hands a 4D mask `(B, 1|H, N_q, N_k)`, boolean (True = attend) or additive float
(0 = attend, a very negative value or -inf = masked). It is converted to an anyattn mask spec without
changing its meaning: a pure key-padding pattern becomes `masks.KeyPadding(lengths)` (which the
approximate methods `performer`, `kernel_rpe` and `sea` honour), the exact causal pattern becomes
`masks.Causal()`, anything else `masks.Dense(bool)`; finite nonzero float entries become an additive
`bias`. With no mask and a causal module (`is_causal`) the spec is `Causal()`. A method that cannot
honour the resulting mask raises ValueError (nothing is silently ignored). Attention dropout is not
supported during training (ValueError).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import masks as _masks

NAME = "anyattn"
_SETTING = {"method": "auto", "options": {}}


def use_method(method: str = "auto", **options) -> None:
    """Set the anyattn method (and its options) used by every `attn_implementation="anyattn"` call."""
    from ..registry import get

    if method != "auto":
        get(method)  # raises ValueError naming the registered methods
    _SETTING["method"] = method
    _SETTING["options"] = dict(options)


def current() -> tuple[str, dict]:
    """The method and options in use."""
    return _SETTING["method"], dict(_SETTING["options"])


@contextmanager
def using(method: str, **options):
    """Context manager: use `method` (with options) inside the block, then restore the previous one."""
    prev = current()
    use_method(method, **options)
    try:
        yield
    finally:
        use_method(prev[0], **prev[1])


def _masked_value(mask: torch.Tensor) -> torch.Tensor:
    """Bool: True where an additive float mask blocks attention (-inf or <= half the dtype's minimum)."""
    return (mask == float("-inf")) | (mask <= torch.finfo(mask.dtype).min / 2)


def convert_mask(attention_mask, B: int, H: int, n_q: int, n_k: int):
    """transformers' 4D attention mask -> `(mask_spec, bias)` for `anyattn.attention` (see module doc)."""
    if attention_mask is None:
        return None, None
    m = attention_mask
    if m.dim() != 4:
        raise ValueError(f"attention_mask must be 4D (B, 1|H, N_q, N_k), got shape {tuple(m.shape)}")
    bias = None
    if m.dtype == torch.bool:
        allowed = m
    elif m.dtype.is_floating_point:
        blocked = _masked_value(m)
        allowed = ~blocked
        finite = m.masked_fill(blocked, 0.0)
        if bool((finite != 0).any()):
            bias = finite
    else:
        raise TypeError(f"attention_mask must be a bool or float tensor, got {m.dtype}")
    if bool(allowed.all()):
        return None, bias
    spec = _spec_from_bool(allowed, B, n_q, n_k)
    return spec, bias


def _spec_from_bool(allowed: torch.Tensor, B: int, n_q: int, n_k: int):
    a = allowed
    same_rows = a.shape[1] == 1 and (a.shape[2] == 1 or bool((a == a[:, :, :1]).all()))
    if same_rows:
        row = a[:, 0, 0]  # (B|1, N_k)
        lengths = row.sum(-1)
        prefix = torch.arange(a.shape[-1], device=a.device).view(1, -1) < lengths.view(-1, 1)
        if bool((prefix == row).all()):
            return _masks.KeyPadding(lengths.expand(B).to("cpu") if lengths.numel() == 1 else lengths.to("cpu"))
    causal = _masks.Causal().dense(1, 1, n_q, n_k, a.device)
    if a.shape[-2] == n_q and bool((a == causal).all()):
        return _masks.Causal()
    return _masks.Dense(a)


def _fallback_dense(method, query, key, value, mask, bias, scaling, attention_mask):
    """The structured spec when `method` honours it, else the same mask as `Dense(bool)` when the method
    honours that (e.g. `sdpa` has no KeyPadding form); otherwise the structured spec, so the method's own
    refusal reaches the caller."""
    from ..api import _request
    from ..registry import get

    m = get(method)
    if m.supports(_request(query, key, value, mask, bias, scaling, False)) is None:
        return mask
    B, H, n_q, _ = query.shape
    dense = _masks.Dense(mask.dense(B, H, n_q, key.shape[2], query.device))
    if m.supports(_request(query, key, value, dense, bias, scaling, False)) is None:
        return dense
    return mask


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers attention function: query `(B, H, N_q, D)`, key/value `(B, H_kv, N_k, D)` ->
    `(out (B, N_q, H, D_v), None)`."""
    from ..api import attention

    if dropout and getattr(module, "training", False):
        raise ValueError(f"anyattn does not implement attention dropout; got dropout={dropout} in training mode")
    method = kwargs.get("anyattn_method") or _SETTING["method"]
    options = dict(_SETTING["options"]) if kwargs.get("anyattn_method") is None else {}
    options.update(kwargs.get("anyattn_options") or {})
    B, H, n_q, _ = query.shape
    n_k = key.shape[2]
    mask, bias = convert_mask(attention_mask, B, H, n_q, n_k)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if attention_mask is None and causal and n_q > 1:
        mask = _masks.Causal()
    if bias is not None:
        bias = bias.to(query.dtype)
    if method != "auto" and mask is not None and not isinstance(mask, _masks.Dense):
        mask = _fallback_dense(method, query, key, value, mask, bias, scaling, attention_mask)
    out = attention(query, key, value, mask=mask, bias=bias, scale=scaling, method=method, **options)
    return out.transpose(1, 2).contiguous(), None


def register(method: str | None = None, **options) -> str:
    """Register "anyattn" with transformers' AttentionInterface and AttentionMaskInterface; optionally
    set the method (`register(method="hyper", block_size=64)`). Returns the implementation name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("anyattn.integrations.transformers needs the `transformers` package") from e
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    if method is not None:
        use_method(method, **options)
    return NAME
