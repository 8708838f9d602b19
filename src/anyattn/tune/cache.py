"""The tune cache file: this machine's measured crossovers, read by `method="auto"` and the engines.

`anyattn tune` (`anyattn.tune.measure`) measures, on the machine at hand, what the built-in cost models
only estimate, and writes it to a small JSON file:

- location: `$ANYATTN_TUNE_CACHE` if set (an empty value or "none" disables the cache), else
  `$XDG_CACHE_HOME/anyattn/tune.json` (`~/.cache/anyattn/tune.json`);
- without a cache (or without an entry for a configuration) the built-in defaults stand.

Format: `{"version": 1, "machine": {...}, "entries": {kind: {key: {"value": ..., "measured": {...}}}}}`.
Kinds and keys: `anyattn.tune.keys`. `measured` holds the timings (ms) behind the choice;
`anyattn.explain` quotes them.
"""
from __future__ import annotations

import json
import os

VERSION = 1
_LOADED: dict = {}


def cache_path() -> str | None:
    """Path of the tune cache, or None when disabled (`ANYATTN_TUNE_CACHE` empty or "none")."""
    env = os.environ.get("ANYATTN_TUNE_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "none") else env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "anyattn", "tune.json")


def load() -> dict:
    """The cache's contents (`{"entries": {}}` when there is none or it is unreadable); re-read when the
    file changes."""
    path = cache_path()
    if path is None or not os.path.exists(path):
        return {"entries": {}}
    stamp = (path, os.path.getmtime(path), os.path.getsize(path))
    if _LOADED.get("stamp") != stamp:
        try:
            with open(path) as f:
                data = json.load(f)
            if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
                data = {"entries": {}}
        except (OSError, ValueError):
            data = {"entries": {}}
        _LOADED.update(stamp=stamp, data=data)
    return _LOADED["data"]


def entry(kind: str, key: str) -> dict | None:
    """The cached record `{"value", "measured", ...}` for one configuration, or None."""
    rec = load()["entries"].get(kind, {}).get(key)
    return rec if isinstance(rec, dict) and "value" in rec else None


def lookup(kind: str, key: str):
    """The cached value for one configuration, or None (then the built-in default stands)."""
    rec = entry(kind, key)
    return None if rec is None else rec["value"]


def save(data: dict, path: str | None = None) -> str:
    """Write `data` (with "entries") to the cache file, merging with the entries already there."""
    path = path or cache_path()
    if path is None:
        raise ValueError("the tune cache is disabled (ANYATTN_TUNE_CACHE is empty or 'none'); pass a path")
    old = load() if path == cache_path() else {"entries": {}}
    entries = {k: dict(v) for k, v in old.get("entries", {}).items()}
    for kind, recs in data["entries"].items():
        entries.setdefault(kind, {}).update(recs)
    out = {"version": VERSION, "machine": data.get("machine", {}), "entries": entries}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _LOADED.clear()
    return path
