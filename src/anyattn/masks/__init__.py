"""Mask specifications (DESIGN.md "Masks and biases are specifications, not tensors"): the core specs
and their combinators (`core.py`) and neighborhood attention on a flattened grid (`neighborhood.py`)."""
from .core import (And, Causal, Dense, Document, KeyPadding, Mask, MaskMod, Or, SlidingWindow, Span, as_mask)
from .neighborhood import Neighborhood

__all__ = ["Mask", "Span", "Causal", "SlidingWindow", "KeyPadding", "Document", "Dense", "MaskMod", "And", "Or",
           "Neighborhood", "as_mask"]
