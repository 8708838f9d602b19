"""anyattn: fast attention and sequence-mixing operators with exact references, forward and backward
on every device PyTorch runs on. See README.md and docs/."""
from . import biases, linear, masks, ssm
from .api import attention, explain, methods
from .approx.error import error
from . import cache  # noqa: E402  (after .api: cache builds on it)
from .cache import decode
from .lse import merge
from .softmax.neighborhood import neighborhood
from .grid_order import grid_order
from .softmax.combiner import combiner, combiner_step
from .softmax.local_global import local_global_attention
from .softmax.local_linear import local_linear_attention
from .softmax.parallax import parallax_attention
from .softmax.simplicial import simplicial_attention

__version__ = "0.1.0"
__all__ = ["attention", "explain", "methods", "merge", "error", "decode", "cache", "neighborhood", "combiner",
           "combiner_step", "local_global_attention", "grid_order", "simplicial_attention", "parallax_attention",
           "local_linear_attention", "masks", "biases", "linear", "ssm"]
