"""One switch for the engines that have a hand-written backward (the linear family's chunk engines, the
selective scan): inside `autograd_backward()` they build their graph through autograd instead, as before
the hand-written backward existed. That path is the gradient oracle of the tests and the "landed"
baseline of the benchmarks. Not thread-safe; not meant for training code."""
from __future__ import annotations

import contextlib

_AUTOGRAD = [False]


@contextlib.contextmanager
def autograd_backward(enabled: bool = True):
    """Within this context, engines with a hand-written backward differentiate by autograd instead."""
    old = _AUTOGRAD[0]
    _AUTOGRAD[0] = bool(enabled)
    try:
        yield
    finally:
        _AUTOGRAD[0] = old


def use_autograd() -> bool:
    """Whether `autograd_backward()` is active."""
    return _AUTOGRAD[0]
