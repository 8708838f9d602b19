"""Model layers. Every mixer layer follows `forward(x, state=None, use_cache=False) -> (y, new_state)`
with x `(B, L, hidden)`, so one decoding loop serves softmax, linear and SSM layers, and a model can
switch mixers by name (`MIXERS`)."""
from .attention import Attention
from .chimera_layer import ChimeraLayer
from .grid_layers import SS2D, AFFLayer, DiNATLayer, SerpentBlock, dinat_dilations
from .generate import generate, prefill, reorder_states, step
from .linear_attention_layer import LinearAttentionLayer
from .linear_layers import LINEAR_LAYERS, GatedDeltaNetLayer, GLALayer, KDALayer, MoMLayer
from .memory_layers import (MEMORY_LAYERS, FlowformerLayer, LightNetLayer, TitansLayer, TransNormerLayer,
                            transnormer_layers)
from .regression_layers import REGRESSION_LAYERS, LocalLinearAttentionLayer, ParallaxLayer
from .neighborhood import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d
from .rotary import RotaryEmbedding, apply_rotary
from .ssm_layers import SSM_LAYERS, LongConvLayer, Mamba2Block, MambaBlock, S4DLayer
from .structured_layers import STRUCTURED_LAYERS, CombinerAttention, SimplicialAttention, TCNCALayer

MIXERS = {"attention": Attention, "linear_attention": LinearAttentionLayer, **LINEAR_LAYERS, **SSM_LAYERS, **STRUCTURED_LAYERS, **MEMORY_LAYERS,
          **REGRESSION_LAYERS}

__all__ = ["MIXERS", "LINEAR_LAYERS", "SSM_LAYERS", "S4DLayer", "MambaBlock", "Mamba2Block", "LongConvLayer",
           "Attention", "LinearAttentionLayer", "GLALayer", "GatedDeltaNetLayer", "KDALayer", "MoMLayer", "generate",
           "prefill", "step", "reorder_states", "NeighborhoodAttention1d", "NeighborhoodAttention2d",
           "NeighborhoodAttention3d", "RotaryEmbedding", "apply_rotary",
           "STRUCTURED_LAYERS", "CombinerAttention", "SimplicialAttention", "TCNCALayer", "ChimeraLayer",
           "DiNATLayer", "dinat_dilations", "AFFLayer", "SS2D", "SerpentBlock", "MEMORY_LAYERS", "LightNetLayer",
           "FlowformerLayer", "TransNormerLayer", "transnormer_layers", "TitansLayer",
           "REGRESSION_LAYERS", "LocalLinearAttentionLayer", "ParallaxLayer"]
