"""`Attention`: a multi-head softmax attention layer with q/k/v/o projections, grouped-query attention,
optional rotary position embeddings (RoPE, Su et al., 2021; `anyattn.nn.rotary`, rotate-half pairing) and a
KV cache for decoding.

Contract shared by every mixer layer in `anyattn.nn` (so `anyattn.nn.generate` drives any stack):

    y, new_state = layer(x, state=None, use_cache=False)

x `(B, N, dim)`. Without a state and without `use_cache` this is ordinary causal (or bidirectional)
attention over x, differentiable in everything. With `use_cache=True` (or a state) the layer appends
the new tokens' keys/values to its `KVCache` (created on the first call) and attends with
`anyattn.decode`; the state returned is that cache. Positions continue from each sequence's cache length.
"""
from __future__ import annotations

import torch
from torch import nn

from ..api import attention
from ..cache.decode import decode
from ..cache.kv_cache import KVCache
from ..distributed.context import current as context_parallel
from ..masks import Causal
from ..validate import check_positive_int, check_tensor
from .rotary import RotaryEmbedding, apply_rotary

class Attention(nn.Module):
    """Multi-head attention layer.

    dim: model width; num_heads H; num_kv_heads H_kv (default H; H % H_kv == 0 for GQA); head_dim
    (default dim // H); bias: projection biases; rotary: apply RoPE to q and k (base `rope_base`, on
    `rotary_dim` channels, default all); causal: causal mask (required for caching); method: the
    `anyattn.attention` method for the uncached path; cache_len: initial KV-cache capacity (it grows);
    cache_options: extra `KVCache` keyword arguments (policy="tokenselect", compress="pca" with
    projection=..., quantize="int8").
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 bias: bool = False, rotary: bool = True, rope_base: float = 10000.0, rotary_dim: int | None = None,
                 causal: bool = True, method: str = "auto", cache_len: int = 256, cache_options: dict | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_kv_heads = check_positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) or pass head_dim")
            head_dim = dim // num_heads
        self.head_dim = check_positive_int("head_dim", head_dim)
        self.rotary = bool(rotary)
        self.rotary_dim = self.head_dim if rotary_dim is None else rotary_dim
        if self.rotary and (self.rotary_dim % 2 != 0 or not 0 < self.rotary_dim <= self.head_dim):
            raise ValueError(f"rotary_dim must be even and in (0, head_dim = {self.head_dim}], got {self.rotary_dim}")
        self.rope_base = float(rope_base)
        self.rope = RotaryEmbedding(self.rotary_dim, self.rope_base) if self.rotary else None
        self.causal = bool(causal)
        self.method = method
        self.cache_len = check_positive_int("cache_len", cache_len)
        self.cache_options = dict(cache_options or {})
        f = dict(device=device, dtype=dtype)
        H, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(dim, H * Dh, bias=bias, **f)
        self.k_proj = nn.Linear(dim, Hk * Dh, bias=bias, **f)
        self.v_proj = nn.Linear(dim, Hk * Dh, bias=bias, **f)
        self.o_proj = nn.Linear(H * Dh, dim, bias=bias, **f)

    def new_cache(self, batch_size: int, dtype: torch.dtype, device) -> KVCache:
        """An empty KV cache for this layer (what `forward(..., use_cache=True)` creates)."""
        return KVCache(batch_size, self.num_kv_heads, self.cache_len, self.head_dim, dtype=dtype, device=device,
                       **self.cache_options)

    def qkv(self, x: torch.Tensor, offset: torch.Tensor | None = None):
        """Projected (and rotated) q `(B, H, N, Dh)`, k, v `(B, H_kv, N, Dh)`; positions start at
        `offset (B,)` (default 0)."""
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            cp = context_parallel()
            pos = (torch.arange(N, device=x.device) if cp is None else cp.positions(x.device))[None, :].expand(B, N)
            if offset is not None:
                pos = pos + offset[:, None].to(x.device)
            cos, sin = self.rope(pos, dtype=q.dtype)  # (B, N, rotary_dim / 2)
            cos, sin = cos[:, None], sin[:, None]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(self, x: torch.Tensor, state: KVCache | None = None, use_cache: bool = False):
        """x `(B, N, dim)` -> `(y (B, N, dim), new_state)`; new_state is the KV cache (None when uncached)."""
        check_tensor("x", x, 3)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, N, dim={self.dim}), got {tuple(x.shape)}")
        if state is not None and not isinstance(state, KVCache) and not callable(getattr(state, "decode", None)):
            raise TypeError(f"state must be None or the KVCache this layer returned (or a cache with append / decode: "
                            f"anyattn.distributed.RemoteKVCache), got {type(state).__name__}")
        B, N, _ = x.shape
        cp = context_parallel()                    # anyattn.distributed.context_parallel: this rank's rows
        if cp is not None:
            cp.refuse_cache(self, state, use_cache)
        cached = use_cache or state is not None
        if cached and not self.causal:
            raise ValueError("a KV cache needs causal=True (decoding appends tokens left to right)")
        if state is not None and state.B != B:
            raise ValueError(f"state holds {state.B} sequences but x has batch size {B}")
        q, k, v = self.qkv(x, None if state is None else state.lengths)
        if cached:
            cache = state if state is not None else self.new_cache(B, q.dtype, q.device)
            cache.append(k, v)
            o = decode(q, cache)
        else:
            cache = None
            mask = Causal() if self.causal else None
            o = attention(q, k, v, mask=mask, method=self.method) if cp is None else cp.attention(q, k, v, mask=mask)
        y = self.o_proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim))
        return y, cache
