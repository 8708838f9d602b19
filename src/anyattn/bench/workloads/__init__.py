"""Benchmark workloads, discovered from the modules of this package.

A module defines either `NAME` + `cases(quick)` or `WORKLOADS = {name: cases_fn}`; see `bench/case.py`.
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache


@lru_cache(maxsize=None)
def registry() -> dict:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(mod, "WORKLOADS"):
            for name, fn in mod.WORKLOADS.items():
                found[name] = (fn, getattr(mod, "DESCRIPTIONS", {}).get(name, (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""))
        elif hasattr(mod, "NAME"):
            found[mod.NAME] = (mod.cases, getattr(mod, "DESCRIPTION", ""))
    return found


def names() -> list[str]:
    return sorted(registry())


def get_cases(name: str, quick: bool):
    reg = registry()
    if name not in reg:
        raise ValueError(f"workload must be one of {sorted(reg)}, got {name!r}")
    return reg[name][0](quick)
