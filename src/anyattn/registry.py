"""Method records for `anyattn.attention(method=...)`: what each method is, what it supports, how it runs.

Engines register themselves with `register(Method(...))` when their module is imported
(`anyattn._builtin` imports them all). `anyattn.methods()` lists the records.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass(frozen=True)
class Request:
    """One validated attention call, as methods see it."""

    q: object
    k: object
    v: object
    mask: object
    bias: object
    scale: float
    shape: object
    return_lse: bool


@dataclass
class Method:
    """name: the `method=` string; exact: computes softmax attention exactly (else approximate);
    supports(req) -> None if the method can run the request, else the reason it cannot;
    run(req, **options) -> (out, lse or None); options: accepted option names and their meaning;
    summary: one line for `methods()` and the README."""

    name: str
    exact: bool
    summary: str
    supports: Callable[[Request], Optional[str]]
    run: Callable
    options: dict = field(default_factory=dict)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"method must be 'auto' or one of {sorted(_METHODS)}, got {name!r}")
    return _METHODS[name]


def all_methods() -> dict[str, Method]:
    return dict(_METHODS)
