"""Additive bias specifications (DESIGN.md "Masks and biases are specifications, not tensors").

A bias spec adds `bias[b, h, i, j]` to the scaled scores `q_i . k_j * scale`. Engines ask it for

- `tensors()`: the tensors it depends on (parameters whose gradients engines must return);
- `tile(tensors, q0, q1, k0, k1, n_q, n_k)`: the bias on a tile, a 4-d tensor broadcastable to
  `(B, H, Tq, Tk)`, computed from the given tensors (so a backward pass can recompute it with autograd
  and get gradients for every learnable part);
- `dense(n_q, n_k)`: the whole bias (quadratic; for references and SDPA);
- `exact_rank(mask, n_q, n_k)` / `exact_factors(mask, n_q, n_k)`: an exact low-rank form
  `bias = U V^T` where one exists (FlashBias, Wu et al. 2025, arXiv:2505.12044): causal ALiBi
  (rank 2, or 4 for slopes that need a hi/lo split), `SpatialDistance` in d dims (rank d + 2),
  `Factored` (its rank). `lowrank(bias, n_q, n_k, rank=, tol=)` gives a truncated SVD of any bias
  and reports the error it reached.

Positions are bottom-right aligned: query `i` of `n_q` sits at key position `p_i = i + n_k - n_q`
(as for causal masks). Biases add: `bias_a + bias_b`. Tiles are computed in at least float32.
"""
from .alibi import Alibi
from .base import Bias, Sum, as_bias, concat_factors
from .bias_mod import BiasMod
from .dense import Dense
from .factored import Factored
from .lowrank import SVD_EXACT_MAX, LowRank, lowrank
from .relative_position import RelativePosition, t5_bucket
from .spatial import SpatialDistance

__all__ = ["Bias", "Sum", "Dense", "Alibi", "RelativePosition", "SpatialDistance", "Factored", "BiasMod", "LowRank",
           "as_bias", "concat_factors", "lowrank", "t5_bucket", "SVD_EXACT_MAX"]
