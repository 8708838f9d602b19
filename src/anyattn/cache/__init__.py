"""KV cache machinery for decoding: `KVCache`, `decode`, TokenSelect token selection, PCA projection
compression (MatryoshkaKV-style) and int8 storage. See docs/decoding.md."""
from .decode import auto_splits, decode
from .int8 import dequantize as int8_dequantize
from .int8 import quantize as int8_quantize
from .kv_cache import KVCache
from .pca import PCACalibrator, PCAProjection, compressed_attention, finetune, fit_pca, greedy_ranks
from .tokenselect import TokenSelect

__all__ = ["KVCache", "decode", "auto_splits", "TokenSelect", "PCAProjection", "PCACalibrator", "fit_pca",
           "greedy_ranks", "finetune", "compressed_attention", "int8_quantize", "int8_dequantize"]
