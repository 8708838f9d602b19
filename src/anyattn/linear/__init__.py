"""Linear-attention and delta-rule family: chunkwise training, recurrent decoding, every device.

Layout `(B, H, N, D)`, state `(B, H, D_k, D_v)` in fp32. See docs/linear.md.
"""
from .feature_maps import (CosformerFeatures, NalaformerFeatures, PerformerFeatures, orthogonal_gaussian,
                           performer_features)
from .ops import (MODES, alibi_slopes, backend_choice, delta_rule, delta_rule_step, gated_delta_rule, gated_delta_rule_step,
                  gla, gla_step, kda, kda_step, lightning, lightning_step, linear_attention,
                  linear_attention_step, retention, retention_step)
from .mom import mom, mom_step
from .flowformer import FlowformerState, flowformer, flowformer_step
from .lightnet import LightNetState, lightnet, lightnet_step
from .titans import TitansState, titans, titans_step
from .ecoformer import fit_ksh
from .feature_maps import EcoformerFeatures

__all__ = [
    "linear_attention", "linear_attention_step", "retention", "retention_step", "lightning",
    "lightning_step", "gla", "gla_step", "delta_rule", "delta_rule_step", "gated_delta_rule",
    "gated_delta_rule_step", "kda", "kda_step", "mom", "mom_step", "titans", "titans_step", "TitansState", "lightnet",
    "lightnet_step", "LightNetState", "flowformer", "flowformer_step", "FlowformerState",
    "fit_ksh", "EcoformerFeatures", "alibi_slopes", "performer_features",
    "orthogonal_gaussian", "PerformerFeatures", "CosformerFeatures", "NalaformerFeatures", "MODES",
    "backend_choice",
]
