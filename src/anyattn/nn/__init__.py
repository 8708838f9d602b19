"""Model layers. Every mixer layer follows `forward(x, state=None, use_cache=False) -> (y, new_state)`
with x `(B, L, hidden)`, so one decoding loop serves softmax, linear and SSM layers, and a model can
switch mixers by name (`MIXERS`)."""
from .linear_layers import LINEAR_LAYERS, GatedDeltaNetLayer, GLALayer, KDALayer

MIXERS = {**LINEAR_LAYERS}

__all__ = ["MIXERS", "LINEAR_LAYERS", "GLALayer", "GatedDeltaNetLayer", "KDALayer"]
