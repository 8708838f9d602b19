"""Chunkwise engines of the linear family, in plain PyTorch ops (any device), each with a hand-written
backward pass. This module is their entry point; the engines live beside it:

* `chunk_decay.chunk_decay_attention` — linear attention, retention / Lightning (scalar decay), GLA
  (per-channel decay):  O = (Q ⊙ e^Γ) S_n + A_qk V,   S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T V.
* `chunk_delta.chunk_delta` — DeltaNet (no decay), Gated DeltaNet (scalar), KDA (per channel); MoM runs it
  per memory. WY / UT transform: T = (I + β ⊙ A_kk^strict)^{-1}, W = T (β e^Γ ⊙ K), U = T (β ⊙ V), then per
  chunk Ṽ = U - W S_n,  O = (Q ⊙ e^Γ) S_n + A_qk Ṽ,  S_{n+1} = e^{Γ_C} ⊙ S_n + (e^{Γ_C - Γ} ⊙ K)^T Ṽ.
* `chunk_math` — what both share: chunking, Γ (in-chunk cumulative log-decay), decayed grams and their
  backward, the unit-triangular solve and inverse, matmul precision.

The sequence is cut into chunks of C tokens (padded at the end with tokens that change nothing: k = v = 0,
beta = 0, g = 0); everything inside a chunk is batched matmuls over all chunks of a group, and only the
state passing is a Python loop over chunks. Grouped-query heads: q carries Gq query heads per key head,
stacked as Gq * C rows of each chunk. bf16 / fp16 inputs: matmul operands in bf16 (fp32 accumulation),
decays, cumsums and states in fp32 (`chunk_math.matmul_dtype`).

`autograd_backward()` (from `anyattn.backward_switch`) switches the ops to the engines' autograd path (the
previous engines differentiated by autograd): the gradient oracle of the tests and the bench's "landed"
baseline. `delta_prepare` / `delta_scan` / `delta_finish` expose the delta autograd path's two phases
(state-independent work, then the state passing for any block of (batch, head) rows) for
`anyattn.distributed`'s pipeline.
"""
from __future__ import annotations

from ..backward_switch import autograd_backward, use_autograd
from .chunk_decay import chunk_decay_attention
from .chunk_delta import chunk_delta, delta_finish, delta_prepare, delta_scan
from .chunk_math import matmul_dtype

__all__ = ["chunk_decay_attention", "chunk_delta", "delta_prepare", "delta_scan", "delta_finish", "matmul_dtype",
           "autograd_backward", "use_autograd"]
