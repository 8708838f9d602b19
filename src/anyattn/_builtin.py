"""Imports every engine module so that each registers its methods."""
from .softmax import flex as _flex  # noqa: F401
from .softmax import lowrank_bias as _lowrank_bias  # noqa: F401
from .softmax import neighborhood as _neighborhood  # noqa: F401
from .softmax import registration as _softmax  # noqa: F401
from .approx import hyper, kernel_rpe, nystrom, performer, sea  # noqa: F401,E402
