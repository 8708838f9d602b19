"""Approximate softmax attention with measured error (METHODS.md "Approximate softmax").

Importing this package registers the methods `hyper`, `nystrom`, `soft`, `performer`, `kernel_rpe` and
`sea` with `anyattn.attention(method=...)`. `error()` measures any method against exact attention;
`choose_approximate()` is what `method="auto"` consults when the caller passes `tolerance=`.
"""
from . import hyper, kernel_rpe, nystrom, performer, sea  # noqa: F401  (register the methods)
from .error import ApproxError, error, relative_errors
from .select import choose_approximate

APPROXIMATE_METHODS = ("hyper", "nystrom", "soft", "performer", "kernel_rpe", "sea")

__all__ = ["error", "ApproxError", "relative_errors", "choose_approximate", "APPROXIMATE_METHODS"]
