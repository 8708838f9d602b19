"""A step loop for autoregressive decoding that drives any stack of mixer layers.

Every layer follows `y, new_state = layer(x, state=None, use_cache=False)` with x `(B, N, dim)`:
softmax attention layers keep a `KVCache` as their state, linear-attention / delta-rule layers a
recurrent state `(B, H, D_k, D_v)`, SSM layers their scan state. The loop does not care which:

    y, states = prefill(layers, prompt)              # the whole prompt, states created
    y_t, states = step(layers, x_t, states)          # one (or a few) new tokens per sequence
    out, states = generate(layers, prompt, 16, next_input=fn)

`next_input(y_t) -> x_{t+1}` maps the last output `(B, 1, dim)` to the next input (e.g. embed the argmax
of an LM head); the default feeds the output back. `reorder_states(states, index)` reorders every
state for beam search (`KVCache.reorder`, `index_select` on tensors, recursively in tuples / lists /
dicts).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..cache.kv_cache import KVCache
from ..validate import check_positive_int, check_tensor


def _layers(layers) -> list:
    if isinstance(layers, (list, tuple, nn.ModuleList, nn.Sequential)):
        out = list(layers)
    elif callable(layers):
        out = [layers]
    else:
        raise TypeError(f"layers must be a layer or a sequence of layers, got {type(layers).__name__}")
    if not out:
        raise ValueError("layers must hold at least one layer")
    return out


def _run(layers, x, states, what):
    layers = _layers(layers)
    if states is None:
        states = [None] * len(layers)
    if len(states) != len(layers):
        raise ValueError(f"states must hold one state per layer ({len(layers)}), got {len(states)}")
    check_tensor(what, x, 3)
    new = []
    for i, (layer, s) in enumerate(zip(layers, states)):
        out = layer(x, state=s, use_cache=True)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"layer {i} ({type(layer).__name__}) must return (y, new_state) from "
                            f"forward(x, state=None, use_cache=False), got {type(out).__name__}")
        x, s = out
        new.append(s)
    return x, new


def prefill(layers, x: torch.Tensor, states: list | None = None):
    """Run the prompt x `(B, N, dim)` through the stack with caching. Returns `(y (B, N, dim), states)`."""
    return _run(layers, x, states, "x")


def step(layers, x_t: torch.Tensor, states: list):
    """One decoding step: x_t `(B, T, dim)` (usually T = 1) through the stack with the states from `prefill`
    or the previous step. Returns `(y_t, states)`."""
    if states is None:
        raise ValueError("step needs the states from prefill (or the previous step), got None")
    return _run(layers, x_t, states, "x_t")


def generate(layers, prompt: torch.Tensor, max_new_tokens: int, *,
             next_input: Callable[[torch.Tensor], torch.Tensor] | None = None, states: list | None = None,
             return_prompt_output: bool = False):
    """Autoregressive loop: prefill `prompt (B, N, dim)`, then `max_new_tokens` steps; step t feeds
    `next_input(y_prev)` (default: y_prev itself), where y_prev `(B, 1, dim)` is the previous output (the
    prompt's last output for the first step). Runs under `torch.no_grad()`.

    Returns `(outputs, states)`: outputs `(B, max_new_tokens, dim)`, the stack's outputs at positions
    N, ..., N + max_new_tokens - 1; with `return_prompt_output` the prompt's outputs come first,
    `(B, N + max_new_tokens, dim)`. The result equals running the stack uncached over the prompt followed by
    the fed inputs.
    """
    check_positive_int("max_new_tokens", max_new_tokens, 0)
    fn = (lambda y: y) if next_input is None else next_input
    if not callable(fn):
        raise TypeError(f"next_input must be callable, got {type(next_input).__name__}")
    with torch.no_grad():
        y, states = prefill(layers, prompt, states)
        last = y[:, -1:]
        gen = [y] if return_prompt_output else []
        for _ in range(max_new_tokens):
            x_t = fn(last)
            if not isinstance(x_t, torch.Tensor) or x_t.dim() != 3 or x_t.shape[0] != prompt.shape[0]:
                raise ValueError(f"next_input must return a (B={prompt.shape[0]}, T, dim) tensor, got "
                                 f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__}")
            last, states = step(layers, x_t, states)
            last = last[:, -1:]
            gen.append(last)
        if not gen:
            return y.new_zeros(y.shape[0], 0, y.shape[-1]), states
        return torch.cat(gen, dim=1), states


def reorder_states(states, index: torch.Tensor):
    """Reorder the batch of every state (beam search): a `KVCache` is reordered in place and returned, tensors
    are `index_select`ed on dim 0, tuples / named tuples / lists / dicts recursively, None and numbers stay."""
    if states is None:
        return None
    if isinstance(states, KVCache):
        states.reorder(index)
        return states
    if isinstance(states, torch.Tensor):
        return states.index_select(0, index.to(states.device))
    if isinstance(states, (int, float, bool)):
        return states
    if isinstance(states, (list, tuple)):
        out = [reorder_states(s, index) for s in states]
        if hasattr(states, "_fields"):                                   # NamedTuple states
            return type(states)(*out)
        return type(states)(out) if isinstance(states, tuple) else out
    if isinstance(states, dict):
        return {k: reorder_states(s, index) for k, s in states.items()}
    if hasattr(states, "reorder"):
        states.reorder(index)
        return states
    raise TypeError(f"cannot reorder a state of type {type(states).__name__}")
