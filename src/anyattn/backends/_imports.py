"""Import checks shared by the backend modules: import once, remember the failure."""
from __future__ import annotations

import importlib

_CACHE: dict[str, tuple[object, str | None]] = {}


def load(module: str):
    """`(module, None)`, or `(None, why)` when it cannot be imported (any exception: a CUDA extension
    missing its library, Triton absent, ...)."""
    if module not in _CACHE:
        try:
            _CACHE[module] = (importlib.import_module(module), None)
        except Exception as e:  # noqa: BLE001 - every import failure means "not installed here"
            _CACHE[module] = (None, f"{module} is not importable: {type(e).__name__}: {str(e)[:200]}")
    return _CACHE[module]
