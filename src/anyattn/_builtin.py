"""Imports every engine module so that each registers its methods."""
from .softmax import registration as _softmax  # noqa: F401
