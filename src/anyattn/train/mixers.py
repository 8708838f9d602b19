"""Mixers of the training harness, by text: `--mixers` parsing, layer construction with per-name defaults,
and each mixer's recurrent-state size.

Text: comma-separated entries; each entry a `+`-joined hybrid pattern of layers; each layer
`name[:key=value[:key=value...]]` with `name` in `anyattn.nn.MIXERS`. Values parse as int, float, bool
(`true`/`false`), None (`none`) or str; `a/b` is a tuple (`simplicial:window=16/16`). Examples:
`attention`, `attention:method=performer`, `attention:window=64` (causal sliding window of 64 keys),
`attention:method=neighborhood:window=64`, `linear_attention:feature_map=relu`,
`gated_deltanet+gated_deltanet+attention`.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..api import attention
from ..masks import Causal, Neighborhood, SlidingWindow
from ..nn import MIXERS
from ..nn.attention import Attention

# Layers of anyattn.nn that are not causal mixers of 1-D token sequences (so not in MIXERS): named here so
# that asking for one says why instead of "unknown".
NOT_SEQUENCE_MIXERS = {
    "dinat": "DiNATLayer: 2-D / 3-D grid layer (x (B, *spatial, dim))",
    "aff": "AFFLayer: 2-D grid layer (Fourier mixing over an image)",
    "ss2d": "SS2D: 2-D grid layer (four-direction scans of an image)",
    "serpent": "SerpentBlock: 2-D grid block",
    "chimera": "ChimeraLayer: bidirectional by default (sees later tokens)",
    "neighborhood": "NeighborhoodAttention1d: forward returns a tensor, not the mixer protocol (y, state), and "
                    "is not causal by default; use attention:method=neighborhood:window=W",
}

# options of a constructor the text cannot set
_NOT_OPTIONS = {"self", "device", "dtype"}
_WIDTH = ("dim", "hidden_size", "hidden")


@dataclass(frozen=True)
class LayerSpec:
    """One layer of a pattern: a name in MIXERS and its options."""
    name: str
    options: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return ":".join([self.name] + [f"{k}={_fmt(v)}" for k, v in self.options.items()])


def _fmt(v) -> str:
    return "/".join(map(str, v)) if isinstance(v, tuple) else str(v)


def parse_value(text: str):
    """`"3"` -> 3, `"0.5"` -> 0.5, `"true"` -> True, `"none"` -> None, `"16/16"` -> (16, 16), else the str."""
    if "/" in text:
        return tuple(parse_value(t) for t in text.split("/"))
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def valid_options(name: str) -> list[str]:
    """Options `name:key=value` accepts: the constructor's keyword parameters (width excluded), plus
    `window` for attention."""
    params = [p for p in inspect.signature(MIXERS[name].__init__).parameters if p not in _NOT_OPTIONS]
    params = params[1:] if params and params[0] in _WIDTH else params
    return params + (["window"] if name == "attention" else [])


def parse_layer(text: str) -> LayerSpec:
    """`"name:key=value:..."` -> LayerSpec; unknown names or options raise ValueError listing the valid ones."""
    parts = text.strip().split(":")
    name = parts[0].strip()
    if name in NOT_SEQUENCE_MIXERS:
        raise ValueError(f"mixer {name!r} is not a causal 1-D sequence mixer ({NOT_SEQUENCE_MIXERS[name]}); "
                         f"choose one of {sorted(MIXERS)}")
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r} in {text!r}; choose one of {sorted(MIXERS)}")
    valid = valid_options(name)
    options = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"mixer option {part!r} in {text!r} must be key=value")
        if key not in valid:
            raise ValueError(f"mixer {name!r} has no option {key!r}; options: {valid}")
        options[key] = parse_value(value.strip())
    if options.get("causal") is False:
        raise ValueError(f"{text!r}: the harness trains causal models; causal=False would show later tokens")
    return LayerSpec(name, options)


def parse_mixers(text: str) -> list[tuple[str, tuple[LayerSpec, ...]]]:
    """`--mixers` text -> [(entry text, pattern of LayerSpecs)], one per comma-separated entry."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"mixers must be a non-empty comma-separated list of mixer names, got {text!r}")
    out = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"empty mixer entry in {text!r}")
        layers = [t for t in entry.split("+")]
        if any(not t.strip() for t in layers):
            raise ValueError(f"empty layer in the hybrid pattern {entry!r}")
        out.append((entry, tuple(parse_layer(t) for t in layers)))
    return out


def _heads(hidden: int) -> int:
    """Default head count: head width 32 (2 heads at width 64, Zoology's MHA setting)."""
    return max(1, hidden // 32)


def _mamba2_headdim(hidden: int, opts: dict) -> int:
    inner = opts.get("expand", 2) * hidden
    return max(d for d in range(1, min(64, inner) + 1) if inner % d == 0)


def defaults(name: str, hidden: int, seq_len: int, opts: dict) -> dict:
    """Per-name defaults the harness adds (user options win): heads of width 32, `longconv` kernel of
    seq_len taps, Mamba-2 head width dividing its inner width."""
    params = inspect.signature(MIXERS[name].__init__).parameters
    out = {}
    if "num_heads" in params:
        out["num_heads"] = _heads(hidden)
    if name == "longconv":
        out["max_len"] = seq_len
    if name == "mamba2":
        out["headdim"] = _mamba2_headdim(hidden, opts)
    return {**out, **opts}


class WindowedAttention(Attention):
    """`Attention` restricted to a causal sliding window of `window` keys (the query's own included), as a
    `Causal & SlidingWindow(window - 1, 0)` mask, or a causal 1-D `Neighborhood` of kernel `window` for
    `method="neighborhood"`. Training only: it keeps no decode state (state_size counts the window)."""

    def __init__(self, dim: int, num_heads: int, *args, window: int, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.window = window

    def forward(self, x, state=None, use_cache: bool = False):
        if state is not None or use_cache:
            raise ValueError("attention with window= has no decode path in the training harness")
        B, N, _ = x.shape
        q, k, v = self.qkv(x)
        mask = (Neighborhood(N, min(self.window, N), is_causal=True) if self.method == "neighborhood"
                else Causal() & SlidingWindow(self.window - 1, 0))
        o = attention(q, k, v, mask=mask, method=self.method)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)), None


def build_mixer(name: str, opts: dict, hidden: int, seq_len: int) -> torch.nn.Module:
    """The layer `name` of width `hidden` for sequences of `seq_len` tokens, with `defaults` and `opts`.
    A constructor's own error is re-raised as ValueError naming the mixer."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    kw = defaults(name, hidden, seq_len, dict(opts))
    if name == "attention" and kw.get("method") == "neighborhood" and "window" not in kw:
        raise ValueError("attention:method=neighborhood needs window=W (the causal neighborhood's size)")
    cls = WindowedAttention if name == "attention" and "window" in kw else MIXERS[name]
    try:
        return cls(hidden, **kw)
    except (TypeError, ValueError) as e:
        raise ValueError(f"mixer {name!r} with options {kw}: {e}") from e


# Per-task recipe defaults (user options win): Zoology's MQAR configs run Gated DeltaNet without its output
# gate (`use_gate=False`); under Zoology's N(0, 0.02) initialisation the swish gate starts near 0.01 and the
# gated layer stays at chance for hundreds of steps (docs/train.md).
RECIPE_DEFAULTS = {"mqar": {"gated_deltanet": {"use_gate": False}}}


def build_pattern(pattern, hidden: int, seq_len: int, task: str | None = None) -> list[torch.nn.Module]:
    """The layers of a parsed pattern (a sequence of LayerSpec), with `task`'s `RECIPE_DEFAULTS`."""
    extra = RECIPE_DEFAULTS.get(task, {})
    return [build_mixer(s.name, {**extra.get(s.name, {}), **s.options}, hidden, seq_len) for s in pattern]


def _floats(obj, seen) -> int:
    """Floats held by the tensors inside a state (dicts, sequences, objects' attributes); complex counts 2."""
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * (2 if obj.is_complex() else 1)
    if isinstance(obj, dict):
        return sum(_floats(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_floats(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(_floats(v, seen) for v in vars(obj).values())
    return 0


@torch.no_grad()
def state_size(layer: torch.nn.Module, seq_len: int) -> int:
    """Recurrent-state floats per sequence after `seq_len` tokens. Softmax attention: its KV cache,
    `2 L H_kv D` (grows with L; a window caps L). Other layers: one `use_cache=True` forward of `seq_len`
    tokens and every tensor element of the state it returns (recurrent states, short-convolution caches,
    the attention windows of hybrids; long convolutions: their `max_len` input history)."""
    if isinstance(layer, Attention):
        tokens = min(seq_len, layer.window) if isinstance(layer, WindowedAttention) else seq_len
        return 2 * tokens * layer.num_kv_heads * layer.head_dim
    p = next(layer.parameters())
    width = next(getattr(layer, a) for a in ("dim", "hidden_size", "hidden") if hasattr(layer, a))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, seq_len, width, generator=gen).to(p.device, p.dtype)  # host: seeded probe, moved to the layer
    _, state = layer(x, use_cache=True)
    return _floats(state, set())
