"""Sequence-mixer layers of the recurrent memories and linear variants (issue 15), each following
`forward(x (B, T, hidden), state=None, use_cache=False) -> (y, new_state)` so that prefill-then-decode
and token-by-token decoding equal the full forward.

- `LightNetLayer` (Qin et al., 2025): q = silu(W_q x), key logits, v; `anyattn.linear.lightnet`;
  RMSNorm with a Swish output gate; state `{"recurrent": LightNetState}`.
- `FlowformerLayer` (Wu et al., 2022): q, k, v projections, causal `anyattn.linear.flowformer`, output
  projection (as the public code); state `{"recurrent": FlowformerState}`.
- `TransNormerLayer` (Qin et al., 2022, "The Devil in Linear Transformer"): `attention="norm"`:
  NormAttention, `RMSNorm(phi(Q) (phi(K)^T V))` with phi = 1 + elu, no denominator, scale 1, then a Swish
  output gate; `attention="diag"`: DiagAttention, softmax attention inside non-overlapping causal blocks
  of `block_size` tokens (a `Document(i // block_size)` mask on the blocked engine). `transnormer_layers`
  builds the paper's stack: DiagAttention in the first half of the layers, NormAttention in the rest.
- `TitansLayer` (Behrouz et al., 2025) with the linear memory `anyattn.linear.titans`, persistent memory
  tokens and attention, `variant=`:
  "mag" (memory as a gate): `y = SWA*([p || x])`, `o = RMSNorm(y) ⊙ sigmoid(RMSNorm(M([p || x])))`;
  "mal" (memory as a layer): `y = M([p || x])`, `o = SWA*(y)`;
  "mac" (memory as context): per segment S of `segment_size` tokens, `h = M_{start}^*(q_S)` (a read of
  the memory as it was at the segment's start), `y = Attn([p || h || S])`, then the memory learns from
  y and `o = RMSNorm(y) ⊙ sigmoid(RMSNorm(M^*(y)))` (read after write).
  SWA* is causal sliding-window attention (`window` keys, the query's own included) whose persistent
  prefix stays visible to every query (the paper's Fig. 3b); it runs as two calls merged by their LSE.
  In MAC, token i of a segment sees the persistent tokens, the retrieved tokens h_j and the segment's
  tokens x_j with j <= i (h_j is read with token j's query: letting token i see h_j for j > i would show
  it later tokens, so the causal form keeps decoding equal to the full forward). Memory queries and keys
  are SiLU + L2-normalized, values SiLU (the paper's section 4.4); theta, alpha, eta = sigmoid(W x + b)
  per head and token.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import linear as _L
from ..api import attention
from ..lse import merge
from ..masks import Causal, Document, SlidingWindow
from .linear_layers import GatedRMSNorm, _check_layer_args, _LinearMixerLayer, _up


def _check_x(x, hidden_size):
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != hidden_size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must have shape (B, T, hidden_size={hidden_size}), got {shape}")


def _check_state(state):
    if state is not None and not isinstance(state, dict):
        raise TypeError(f"state must be a dict returned by forward(..., use_cache=True) or None, "
                        f"got {type(state).__name__}")
    return state or {}


def _heads(x, d):
    B, T, _ = x.shape
    return x.reshape(B, T, -1, d).transpose(1, 2)


def _merge_heads(o):
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


# ---------------------------------------------------------------------------------------- LightNet

class LightNetLayer(_LinearMixerLayer):
    """LightNet layer (Qin et al., 2025, "You Only Scan Once"): q = silu(W_q x) (the op applies none),
    key logits W_k x, values W_v x; `anyattn.linear.lightnet` (scale 1, z0 = -inf); RMSNorm and a Swish
    output gate; output projection."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, mode: str = "chunk", *,
                 expand_v: float = 1.0, chunk_size: int = 64, norm_eps: float = 1e-5, num_kv_heads: int | None = None):
        from .linear_layers import _default_head_dim, _head_v_dim, _kv_heads
        head_dim = _default_head_dim(hidden_size, num_heads, head_dim, 1.0)
        super().__init__(hidden_size, num_heads, head_dim, _head_v_dim(head_dim, expand_v), mode, False, 4, chunk_size, norm_eps, "swish",
                         _kv_heads(num_heads, num_kv_heads))
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False)

    @staticmethod
    def op(q, k, v, **kw):
        return _L.lightnet(F.silu(q), k, v, **kw)

    def gates(self, x):
        return ()

    def output_gate(self, x):
        return self.g_proj(x)


# -------------------------------------------------------------------------------------- Flowformer

class FlowformerLayer(nn.Module):
    """Flowformer layer (Wu et al., 2022): q, k, v projections, causal flow attention (sigmoid features,
    `clamp`), output projection. State `{"recurrent": FlowformerState}`."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, *, clamp: float = 1.0,
                 eps: float = 1e-6, bias: bool = True):
        super().__init__()
        head_dim = head_dim if head_dim is not None else max(1, hidden_size // max(1, num_heads))
        _check_layer_args(hidden_size, num_heads, head_dim, "chunk")
        self.hidden_size, self.num_heads, self.head_dim, self.clamp, self.eps = hidden_size, num_heads, head_dim, clamp, eps
        inner = num_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=bias) for _ in range(3))
        self.o_proj = nn.Linear(inner, hidden_size, bias=bias)

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden_size)
        state = _check_state(state)
        q, k, v = (_heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        o, st = _L.flowformer(q, k, v, clamp=self.clamp, eps=self.eps, initial_state=state.get("recurrent"),
                              output_final_state=True)
        return self.o_proj(_merge_heads(o)), ({"recurrent": st} if use_cache else None)


# ------------------------------------------------------------------------------------- TransNormer

class TransNormerLayer(nn.Module):
    """TransNormer's token mixer (Qin et al., 2022, "The Devil in Linear Transformer"): `attention="norm"`
    (NormAttention: linear attention with phi = 1 + elu, no denominator, scale 1, RMSNorm per head and a Swish
    output gate) or `attention="diag"` (DiagAttention: causal softmax attention inside non-overlapping
    blocks of `block_size` tokens). State: `{"recurrent": S}` (norm) or `{"k", "v", "pos"}`, the current
    block's keys and values and the number of tokens seen (diag)."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, *, attention: str = "norm",
                 block_size: int = 64, chunk_size: int = 64, norm_eps: float = 1e-5):
        super().__init__()
        head_dim = head_dim if head_dim is not None else max(1, hidden_size // max(1, num_heads))
        _check_layer_args(hidden_size, num_heads, head_dim, "chunk")
        if attention not in ("norm", "diag"):
            raise ValueError(f"attention must be 'norm' or 'diag', got {attention!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.attention, self.block_size, self.chunk_size = attention, block_size, chunk_size
        inner = num_heads * head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        if attention == "norm":
            self.g_proj = nn.Linear(hidden_size, inner, bias=False)
            self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps, activation="swish")

    def _norm(self, q, k, v, x, state):
        o, S = _L.linear_attention(q, k, v, feature_map="elu1", scale=1.0, initial_state=state.get("recurrent"),
                                   output_final_state=True, chunk_size=self.chunk_size)
        o = o.transpose(1, 2)
        o = self.o_norm(o, self.g_proj(x).reshape(*o.shape))
        return o.reshape(x.shape[0], x.shape[1], -1), {"recurrent": S}

    def _diag(self, q, k, v, state):
        pos = state.get("pos", 0)
        w, T = self.block_size, q.shape[2]
        ck, cv = state.get("k"), state.get("v")
        if ck is not None:
            k, v = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        start = pos - (0 if ck is None else ck.shape[2])                         # absolute position of key 0
        blocks = torch.arange(start, pos + T, device=q.device).div(w, rounding_mode="floor")
        mask = Document(blocks[-T:], blocks) & Causal()
        o = attention(q, k, v, mask=mask)
        keep = (pos + T) % w                                                      # tokens of the unfinished block
        new = {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:], "pos": pos + T}
        return _merge_heads(o), new

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden_size)
        state = _check_state(state)
        q, k, v = (_heads(p(x), self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        o, new = self._norm(q, k, v, x, state) if self.attention == "norm" else self._diag(q, k, v, state)
        return self.o_proj(o), (new if use_cache else None)


def transnormer_layers(num_layers: int, hidden_size: int, num_heads: int = 4, **kw) -> nn.ModuleList:
    """TransNormer's stack of token mixers: DiagAttention in the first `num_layers // 2` layers (local
    dependencies early), NormAttention in the others."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    return nn.ModuleList(TransNormerLayer(hidden_size, num_heads, attention="diag" if i < num_layers // 2 else "norm",
                                          **kw) for i in range(num_layers))


# ------------------------------------------------------------------------------------------ Titans

class _Memory(nn.Module):
    """Titans' linear memory over its input: SiLU + L2-normalized queries and keys, SiLU values, gates
    theta, alpha, eta = sigmoid(W x + b) per head; returns the per-head reads `(B, H, T, D)`."""

    def __init__(self, hidden_size, num_heads, head_dim, chunk_size, mode):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim, self.chunk_size, self.mode = num_heads, head_dim, chunk_size, mode
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=False) for _ in range(3))
        self.gate_proj = nn.Linear(hidden_size, 3 * num_heads)
        with torch.no_grad():                    # start near theta 0.1, alpha 0.02, eta 0.9
            self.gate_proj.bias.copy_(torch.tensor([-2.2, -4.0, 2.2]).repeat_interleave(num_heads))

    def query(self, x):
        return F.normalize(F.silu(_heads(self.q_proj(x), self.head_dim)), dim=-1)

    def read(self, x, M):
        """`scale q M` without learning: the memory as given."""
        return self.head_dim ** -0.5 * self.query(x) @ M.to(x.dtype)

    def forward(self, x, state):
        k = F.normalize(F.silu(_heads(self.k_proj(x), self.head_dim)), dim=-1)
        v = F.silu(_heads(self.v_proj(x), self.head_dim))
        gates = torch.sigmoid(_up(self.gate_proj(x))).transpose(1, 2).unflatten(1, (3, self.num_heads))
        theta, alpha, eta = gates.unbind(1)
        return _L.titans(self.query(x), k, v, theta, alpha, eta, chunk_size=self.chunk_size, initial_state=state,
                         output_final_state=True, mode=self.mode)


class TitansLayer(nn.Module):
    """Titans layer with the linear memory (see the module docstring). hidden_size, num_heads, head_dim
    (default hidden_size // num_heads) for both the memory and the attention; variant "mac" | "mag" | "mal";
    window: keys per query of the sliding-window attention (mag, mal); segment_size: MAC's segment;
    num_persistent: N_p learned persistent tokens; chunk_size: the memory's mini-batch; mode: the memory's
    "chunk" | "recurrent". State: `{"memory": TitansState, ...}` plus the attention's keys and values
    still visible (window, or the current segment for MAC)."""

    def __init__(self, hidden_size: int, num_heads: int = 4, head_dim: int | None = None, variant: str = "mag", *,
                 window: int = 64, segment_size: int = 64, num_persistent: int = 4, chunk_size: int = 16,
                 mode: str = "chunk", norm_eps: float = 1e-5):
        super().__init__()
        head_dim = head_dim if head_dim is not None else max(1, hidden_size // max(1, num_heads))
        _check_layer_args(hidden_size, num_heads, head_dim, mode)
        if variant not in ("mac", "mag", "mal"):
            raise ValueError(f"variant must be 'mac', 'mag' or 'mal', got {variant!r}")
        for name, val in (("window", window), ("segment_size", segment_size), ("num_persistent", num_persistent),
                          ("chunk_size", chunk_size)):
            if isinstance(val, bool) or not isinstance(val, int) or val < (0 if name == "num_persistent" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'num_persistent' else 'positive'} int, "
                                 f"got {val!r}")
        self.hidden_size, self.num_heads, self.head_dim, self.variant = hidden_size, num_heads, head_dim, variant
        self.window, self.segment_size, self.num_persistent = window, segment_size, num_persistent
        inner = num_heads * head_dim
        self.persistent = nn.Parameter(torch.randn(num_persistent, hidden_size) * 0.02) if num_persistent else None
        self.memory = _Memory(hidden_size, num_heads, head_dim, chunk_size, mode)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden_size, inner, bias=False) for _ in range(3))
        self.o_proj = nn.Linear(inner, hidden_size, bias=False)
        if variant == "mal":
            self.mem_out = nn.Linear(inner, hidden_size, bias=False)           # memory reads -> attention input
        else:
            self.y_norm = nn.RMSNorm(head_dim, eps=norm_eps)
            self.m_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        if variant == "mac":
            self.h_proj = nn.Linear(inner, hidden_size, bias=False)            # retrieved reads -> tokens
            self.y_proj = nn.Linear(inner, hidden_size, bias=False)            # attention output -> memory input

    # -- pieces
    def _kv(self, x):
        return _heads(self.k_proj(x), self.head_dim), _heads(self.v_proj(x), self.head_dim)

    def _prefix(self, B, like):
        """Keys and values of the persistent tokens `(B, H, N_p, D)` (None without persistent tokens)."""
        if self.num_persistent == 0:
            return None
        src = self.persistent.to(like.dtype)[None].expand(B, -1, -1)
        if self.variant == "mal":
            src = self._mal_prefix_input(src)
        return self._kv(src)

    def _mal_prefix_input(self, p):
        """MAL's attention input at the persistent positions: the memory's reads there (from its start state)."""
        o, _ = self.memory(p, None)
        return self.mem_out(_merge_heads(o))

    def _attend(self, q, parts):
        """Softmax attention of q over several key sets merged by their LSE: parts = [(k, v, mask), ...]."""
        outs, lses = [], []
        for k, v, mask in parts:
            o, lse = attention(q, k, v, mask=mask, return_lse=True)
            outs.append(o)
            lses.append(lse)
        return outs[0] if len(outs) == 1 else merge(outs, lses)[0]

    def _gate(self, y, m):
        return self.y_norm(y) * torch.sigmoid(self.m_norm(m).to(y.dtype))

    def _start_memory(self, B, like):
        """Memory state after the persistent tokens (they come first in [p || x])."""
        if self.num_persistent == 0:
            return None
        _, st = self.memory(self.persistent.to(like.dtype)[None].expand(B, -1, -1), None)
        return st

    # -- variants
    def _window(self, x_attn, state):
        """SWA* over the attention input x_attn `(B, T, hidden)`: window keys (cached + new) and the prefix."""
        B, T, _ = x_attn.shape
        q = _heads(self.q_proj(x_attn), self.head_dim)
        k, v = self._kv(x_attn)
        if state.get("k") is not None:
            k, v = torch.cat([state["k"], k], 2), torch.cat([state["v"], v], 2)
        parts = [(k, v, SlidingWindow(self.window - 1, 0))]
        prefix = self._prefix(B, x_attn)
        if prefix is not None:
            parts.append((*prefix, None))
        o = self._attend(q, parts)
        keep = min(self.window - 1, k.shape[2])
        return o, {"k": k[:, :, k.shape[2] - keep:], "v": v[:, :, v.shape[2] - keep:]}

    def _mag(self, x, state):
        mem = state["memory"] if "memory" in state else self._start_memory(x.shape[0], x)
        m, mem = self.memory(x, mem)
        y, cache = self._window(x, state)
        return self._gate(y, m), {"memory": mem, **cache}

    def _mal(self, x, state):
        mem = state["memory"] if "memory" in state else self._start_memory(x.shape[0], x)
        m, mem = self.memory(x, mem)
        y, cache = self._window(self.mem_out(_merge_heads(m)), state)
        return y, {"memory": mem, **cache}

    def _mac(self, x, state):
        B, T, _ = x.shape
        S = self.segment_size
        mem = state["memory"] if "memory" in state else self._start_memory(B, x)
        if mem is None:
            z = x.new_zeros(B, self.num_heads, self.head_dim, self.head_dim, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
            mem = _L.TitansState(z, z, z, 0)
        seg_mem = state.get("seg_memory", mem.M)
        pos, ck, cv = state.get("pos", 0), state.get("k"), state.get("v")
        prefix = self._prefix(B, x)
        outs, t = [], 0
        while t < T:
            n = min(S - pos % S, T - t)                                          # up to the segment's end
            xs = x[:, t:t + n]
            h = self.h_proj(_merge_heads(self.memory.read(xs, seg_mem)))         # retrieved tokens
            q = _heads(self.q_proj(xs), self.head_dim)
            kh, vh = self._kv(h)
            kx, vx = self._kv(xs)
            if ck is not None:                                                   # earlier tokens of this segment
                L = ck.shape[2] // 2
                kh, vh = torch.cat([ck[:, :, :L], kh], 2), torch.cat([cv[:, :, :L], vh], 2)
                kx, vx = torch.cat([ck[:, :, L:], kx], 2), torch.cat([cv[:, :, L:], vx], 2)
            parts = [(kx, vx, Causal()), (kh, vh, Causal())] + ([(*prefix, None)] if prefix is not None else [])
            y = self._attend(q, parts)
            m, mem = self.memory(self.y_proj(_merge_heads(y)), mem)
            outs.append(self._gate(y, m))
            pos, t = pos + n, t + n
            if pos % S == 0:
                seg_mem, ck, cv = mem.M, None, None
            else:
                ck, cv = torch.cat([kh, kx], 2), torch.cat([vh, vx], 2)
        o = torch.cat(outs, 2)
        return o, {"memory": mem, "seg_memory": seg_mem, "pos": pos, "k": ck, "v": cv}

    def forward(self, x, state=None, use_cache: bool = False):
        _check_x(x, self.hidden_size)
        state = _check_state(state)
        o, new = {"mag": self._mag, "mal": self._mal, "mac": self._mac}[self.variant](x, state)
        return self.o_proj(_merge_heads(o).to(x.dtype)), (new if use_cache else None)


MEMORY_LAYERS = {"lightnet": LightNetLayer, "flowformer": FlowformerLayer, "transnormer": TransNormerLayer,
                 "titans": TitansLayer}
