"""Optional access to flash-linear-attention's pure-PyTorch references (`fla-core` on PyPI).

`import fla` imports Triton kernels at package import time, which fails on machines without
Triton (CPU-only). The `naive.py` files themselves only need torch and einops, so they are
loaded here directly from the installed package's files, without running `fla/__init__.py`.
Layout of those functions: `(B, T, H, D)` (except `delta_rule_recurrence`: `(B, H, T, D)`).
"""
from __future__ import annotations

import importlib.util
import os
import sys

_CACHE: dict[str, object] = {}


def load_naive(op: str):
    """Module `fla/ops/<op>/naive.py` (e.g. "gated_delta_rule", "kda", "gla", "simple_gla",
    "delta_rule", "linear_attn"), or raise ImportError saying why it is unavailable."""
    if op in _CACHE:
        return _CACHE[op]
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("fla-core is not installed (pip install fla-core)")
    try:
        import einops  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise ImportError("fla-core's references need einops (pip install einops)") from e
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", op, "naive.py")
    if not os.path.exists(path):
        raise ImportError(f"fla-core has no {path}")
    name = f"_anyattn_fla_naive_{op}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    _CACHE[op] = module
    return module


def available() -> tuple[bool, str]:
    """(True, "") when the references load, else (False, reason)."""
    try:
        load_naive("gated_delta_rule")
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"
