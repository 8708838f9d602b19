"""Sequence-mixer layers of the structured family (`STRUCTURED_LAYERS`, registered in `anyattn.nn.MIXERS`):

- `CombinerAttention`: q/k/v/o projections around `anyattn.combiner` (Combiner-Fixed); decoding freezes
  finished segments as summaries (`CombinerState`).
- `SimplicialAttention`: projections q, k1, k2, v1, v2, o around `anyattn.simplicial_attention` (causal
  windows); decoding keeps the last `max(w1, w2) - 1` keys and values.
- `TCNCALayer`: TCNCA (Terzic et al., "TCNCA: Temporal Convolution Network with Chunked Attention for
  Scalable Sequence Processing", 2023): a MEGA block whose EMA is replaced by a causal dilated depthwise
  TCN, with softmax attention only inside chunks (a `Document` mask, causal inside).

All follow `forward(x (B, L, dim), state=None, use_cache=False) -> (y (B, L, dim), new_state)`: with
`use_cache=True` (or a state) the returned state continues the sequence, and feeding tokens one by one
gives the outputs of one full forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..api import attention
from ..masks import Causal, Document
from ..softmax.combiner import CombinerState, combiner, combiner_step
from ..softmax.simplicial import simplicial_attention
from ..validate import check_positive_int, check_tensor
from .rotary import RotaryEmbedding, apply_rotary

__all__ = ["CombinerAttention", "SimplicialAttention", "TCNCALayer", "TCNCAState", "STRUCTURED_LAYERS"]


def _check_x(x, dim):
    check_tensor("x", x, 3)
    if x.shape[-1] != dim or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x must have shape (B, L >= 1, dim={dim}), got {tuple(x.shape)}")


def _heads(x, H):
    B, L, _ = x.shape
    return x.view(B, L, H, -1).transpose(1, 2)


def _merge_heads(o):
    B, H, L, Dh = o.shape
    return o.transpose(1, 2).reshape(B, L, H * Dh)


class CombinerAttention(nn.Module):
    """Multi-head Combiner-Fixed attention layer (Ren et al., 2021): `o_proj(combiner(q, k, v))`.

    dim: model width; num_heads, num_kv_heads (grouped-query), head_dim (default dim // num_heads);
    segment_size: tokens per segment (fixed so that decoding and full forwards agree); pooling "max" or
    "mean"; causal; rotary: RoPE on q and k (positions continue from the state when decoding).
    State: a `CombinerState` (summaries of finished segments, the current segment's keys/values).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None, *,
                 segment_size: int = 64, pooling: str = "max", causal: bool = True, rotary: bool = False,
                 rope_base: float = 10000.0, bias: bool = False):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_kv_heads = check_positive_int("num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) or pass head_dim")
        self.head_dim = check_positive_int("head_dim", dim // num_heads if head_dim is None else head_dim)
        self.segment_size = check_positive_int("segment_size", segment_size)
        if pooling not in ("max", "mean"):
            raise ValueError(f"pooling must be 'max' or 'mean', got {pooling!r}")
        self.pooling, self.causal = pooling, bool(causal)
        H, Hk, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(dim, H * Dh, bias=bias)
        self.k_proj = nn.Linear(dim, Hk * Dh, bias=bias)
        self.v_proj = nn.Linear(dim, Hk * Dh, bias=bias)
        self.o_proj = nn.Linear(H * Dh, dim, bias=bias)
        self.rope = RotaryEmbedding(Dh, rope_base) if rotary else None

    def forward(self, x, state: CombinerState | None = None, use_cache: bool = False):
        _check_x(x, self.dim)
        if state is not None and not isinstance(state, CombinerState):
            raise TypeError(f"state must be None or the CombinerState this layer returned, got {type(state).__name__}")
        cached = use_cache or state is not None
        if cached and not self.causal:
            raise ValueError("decoding (use_cache / state) needs causal=True")
        B, L, _ = x.shape
        q, k, v = _heads(self.q_proj(x), self.num_heads), _heads(self.k_proj(x), self.num_kv_heads), \
            _heads(self.v_proj(x), self.num_kv_heads)
        if self.rope is not None:
            pos = torch.arange(L, device=x.device) + (0 if state is None else state.length)
            cos, sin = self.rope(pos, dtype=q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cached:
            o, new = combiner_step(q, k, v, state, segment_size=self.segment_size, pooling=self.pooling)
        else:
            o, new = combiner(q, k, v, segment_size=self.segment_size, is_causal=self.causal,
                              pooling=self.pooling), None
        return self.o_proj(_merge_heads(o)), new


class SimplicialAttention(nn.Module):
    """Multi-head windowed 2-simplicial attention layer (Roy et al., 2025): projections q, k1, k2, v1, v2,
    `o_proj(simplicial_attention(q, k1, k2, v1, v2, window=(w1, w2)))`. Causal; the decode state is a dict
    of the last `max(w1, w2) - 1` tokens' k1, k2, v1, v2 `(B, H, <= w - 1, head_dim)`."""

    def __init__(self, dim: int, num_heads: int, head_dim: int | None = None, *, window=(32, 32),
                 bias: bool = False):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        if head_dim is None and dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) or pass head_dim")
        self.head_dim = check_positive_int("head_dim", dim // num_heads if head_dim is None else head_dim)
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be a pair (w1, w2), got {window!r}")
        self.window = (check_positive_int("w1", window[0]), check_positive_int("w2", window[1]))
        inner = self.num_heads * self.head_dim
        self.proj = nn.Linear(dim, 5 * inner, bias=bias)          # q, k1, k2, v1, v2
        self.o_proj = nn.Linear(inner, dim, bias=bias)

    def forward(self, x, state: dict | None = None, use_cache: bool = False):
        _check_x(x, self.dim)
        if state is not None and (not isinstance(state, dict) or set(state) != {"k1", "k2", "v1", "v2"}):
            raise TypeError("state must be None or the dict {'k1', 'k2', 'v1', 'v2'} this layer returned")
        L = x.shape[1]
        q, k1, k2, v1, v2 = (_heads(t, self.num_heads) for t in self.proj(x).chunk(5, -1))
        if state is not None:
            k1, k2, v1, v2 = (torch.cat([state[n].to(t.dtype), t], 2) for n, t in
                              (("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2)))
            q = torch.cat([q.new_zeros(q.shape[0], q.shape[1], k1.shape[2] - L, q.shape[3]), q], 2)
        o = simplicial_attention(q, k1, k2, v1, v2, window=self.window, is_causal=True)[:, :, -L:]
        new = None
        if use_cache or state is not None:
            keep = max(self.window) - 1
            new = {n: t[:, :, t.shape[2] - min(keep, t.shape[2]):].detach() for n, t in
                   (("k1", k1), ("k2", k2), ("v1", v1), ("v2", v2))}
        return self.o_proj(_merge_heads(o)), new


class _CausalDepthwiseConv(nn.Module):
    """Causal depthwise conv over time with kernel K and dilation d on `(B, C, L)`; the cache holds the
    last `(K - 1) d` inputs."""

    def __init__(self, channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.k, self.d = kernel_size, dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels)

    @property
    def history(self) -> int:
        return (self.k - 1) * self.d

    def forward(self, x, cache=None):
        hist = self.history
        if cache is None:
            cache = x.new_zeros(x.shape[0], x.shape[1], hist)
        xp = torch.cat([cache.to(x.dtype), x], -1)
        return self.conv(xp), xp[..., xp.shape[-1] - hist:]


class TCNCAState:
    """Decode state of `TCNCALayer`: the TCN layers' input histories, the keys and values of the current
    attention chunk `(B, H, t, .)`, and the position. `reorder(index)` reorders the batch."""

    def __init__(self, tcn, k, v, pos: int):
        self.tcn, self.k, self.v, self.pos = tcn, k, v, pos

    def reorder(self, index):
        self.tcn = [t.index_select(0, index.to(t.device)) for t in self.tcn]
        self.k, self.v = (t.index_select(0, index.to(t.device)) for t in (self.k, self.v))


class TCNCALayer(nn.Module):
    """TCNCA block (Terzic et al., 2023): MEGA's gated attention (Ma et al., "Mega: Moving Average Equipped
    Gated Attention", 2023) with the EMA replaced by a temporal convolution network.

        x'  = TCN(x):   depth layers h <- h + SiLU(causal depthwise conv_{K, dilation f^l}(h)), l = 0..depth-1
        z   = SiLU(W_z x' + b_z);  q = z * gamma_q + beta_q;  k = z * gamma_k + beta_k   (num_heads heads)
        v   = SiLU(W_v x + b_v)
        o   = softmax attention inside chunks of `chunk_size` tokens, causal inside (Document & Causal mask)
        r   = SiLU(W_r x' + b_r);  h = SiLU(W_h x' + U_h (r * o) + b_h);  phi = sigmoid(W_phi x' + b_phi)
        y   = phi * h + (1 - phi) * x

    The TCN's receptive field is `1 + (K - 1) * sum_l f^l` tokens (`receptive_field`). Decoding streams:
    each TCN layer keeps its last `(K - 1) f^l` inputs and attention keeps the current chunk's keys/values
    (`TCNCAState`).
    """

    def __init__(self, dim: int, *, zdim: int | None = None, vdim: int | None = None, num_heads: int = 1,
                 chunk_size: int = 64, kernel_size: int = 3, depth: int = 4, dilation_factor: int = 4):
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_heads = check_positive_int("num_heads", num_heads)
        # Defaults (MEGA's proportions): zdim ~ dim / 2, vdim ~ 2 dim, rounded to multiples of num_heads.
        self.zdim = check_positive_int("zdim", zdim if zdim is not None else num_heads * max(1, dim // 2 // num_heads))
        self.vdim = check_positive_int("vdim", vdim if vdim is not None else num_heads * max(1, 2 * dim // num_heads))
        for name, val in (("zdim", self.zdim), ("vdim", self.vdim)):
            if val % num_heads:
                raise ValueError(f"{name} ({val}) must be divisible by num_heads ({num_heads})")
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.kernel_size = check_positive_int("kernel_size", kernel_size)
        self.depth = check_positive_int("depth", depth)
        self.dilation_factor = check_positive_int("dilation_factor", dilation_factor)
        self.tcn = nn.ModuleList(_CausalDepthwiseConv(dim, kernel_size, dilation_factor ** l) for l in range(depth))
        self.z_proj = nn.Linear(dim, self.zdim)
        self.v_proj = nn.Linear(dim, self.vdim)
        self.gamma = nn.Parameter(torch.randn(2, self.zdim) * 0.02 + 1.0)
        self.beta = nn.Parameter(torch.zeros(2, self.zdim))
        self.r_proj = nn.Linear(dim, self.vdim)
        self.h_proj = nn.Linear(dim, dim)
        self.u_proj = nn.Linear(self.vdim, dim, bias=False)
        self.phi_proj = nn.Linear(dim, dim)

    @property
    def receptive_field(self) -> int:
        return 1 + (self.kernel_size - 1) * sum(self.dilation_factor ** l for l in range(self.depth))

    def _tcn(self, x, caches):
        h = x.transpose(1, 2)
        new = []
        for layer, c in zip(self.tcn, caches):
            y, nc = layer(h, c)
            h = h + F.silu(y)
            new.append(nc)
        return h.transpose(1, 2), new

    def forward(self, x, state: TCNCAState | None = None, use_cache: bool = False):
        _check_x(x, self.dim)
        if state is not None and not isinstance(state, TCNCAState):
            raise TypeError(f"state must be None or the TCNCAState this layer returned, got {type(state).__name__}")
        B, L, _ = x.shape
        H = self.num_heads
        xs, tcn_caches = self._tcn(x, [None] * self.depth if state is None else state.tcn)
        z = F.silu(self.z_proj(xs))
        q = _heads(z * self.gamma[0] + self.beta[0], H)
        k = _heads(z * self.gamma[1] + self.beta[1], H)
        v = _heads(F.silu(self.v_proj(x)), H)
        pos0 = 0 if state is None else state.pos
        if state is not None:
            k, v = torch.cat([state.k.to(k.dtype), k], 2), torch.cat([state.v.to(v.dtype), v], 2)
        n_k = k.shape[2]
        c = self.chunk_size
        ids_k = (torch.arange(n_k, device=x.device) + pos0 + L - n_k) // c
        ids_q = ids_k[n_k - L:]
        o = attention(q, k, v, mask=Document(ids_q, ids_k) & Causal(), scale=1.0 / math.sqrt(q.shape[-1]))
        o = _merge_heads(o)
        r = F.silu(self.r_proj(xs))
        h = F.silu(self.h_proj(xs) + self.u_proj(r * o))
        phi = torch.sigmoid(self.phi_proj(xs))
        y = phi * h + (1 - phi) * x
        new = None
        if use_cache or state is not None:
            pos = pos0 + L
            start = (pos // c) * c                     # the current chunk's first position
            keep = pos - start
            new = TCNCAState([t.detach() for t in tcn_caches], k[:, :, n_k - keep:].detach(),
                             v[:, :, n_k - keep:].detach(), pos)
        return y, new


STRUCTURED_LAYERS = {"combiner": CombinerAttention, "simplicial": SimplicialAttention, "tcnca": TCNCALayer}
