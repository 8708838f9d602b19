"""flash-linear-attention's chunk kernels (Yang et al.; `fla-core`, Triton) for `anyattn.linear` on CUDA:
`gla` -> `chunk_gla`, `delta_rule` -> `chunk_delta_rule`, `gated_delta_rule` -> `chunk_gated_delta_rule`,
`kda` -> `chunk_kda`.

Conventions match anyattn's (METHODS.md "Linear / recurrent family"): g is the log-decay (<= 0; per key
channel for GLA and KDA, per token for Gated DeltaNet), beta `(B, H, N)` is used as given (fla's
`use_beta_sigmoid_in_kernel` / `use_gate_in_kernel` / `use_qk_l2norm_in_kernel` stay off), the output is
`scale * S_t^T q_t` with the state updated by token t first, the state is `(B, H, D_k, D_v)` in fp32
(fla's default `state_v_first=False`). Layout: anyattn `(B, H, N, D)` <-> fla `(B, T, H, D)`.
Grouped-query heads (H_q != H) stay on anyattn's engines: fla gives each query head its own state.
"""
from __future__ import annotations

import torch

from ._imports import load

OPS = {"gla": ("fla.ops.gla", "chunk_gla"), "delta_rule": ("fla.ops.delta_rule", "chunk_delta_rule"),
       "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
       "kda": ("fla.ops.kda", "chunk_kda")}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def import_error(op: str = "gated_delta_rule") -> str | None:
    mod, why = load(OPS[op][0])
    return why


def unavailable(op: str, q, k, v) -> str | None:
    """Why fla's chunk kernel cannot run `op` on these inputs (None: it can)."""
    if q.device.type != "cuda":
        return f"fla's Triton kernels are used on CUDA only (device {q.device.type})"
    if q.dtype not in DTYPES:
        return f"fla's kernels take fp32/fp16/bf16, got {q.dtype}"
    if q.shape[1] != k.shape[1]:
        return f"grouped-query heads (H_q = {q.shape[1]} != H = {k.shape[1]}) run on anyattn's engine"
    if max(k.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"fla's kernels take head dims <= {MAX_HEAD_DIM}, got D_k = {k.shape[-1]}, D_v = {v.shape[-1]}"
    return import_error(op)


def _t(x):
    """anyattn `(B, H, N, ...)` <-> fla `(B, N, H, ...)`."""
    return None if x is None else x.transpose(1, 2)


def chunk(op: str, q, k, v, g=None, beta=None, *, scale, initial_state=None, output_final_state=False,
          kernel=None):
    """Run fla's chunk kernel for `op` on anyattn-layout tensors: q, k `(B, H, N, D_k)`, v `(B, H, N, D_v)`,
    g `(B, H, N[, D_k])`, beta `(B, H, N)`, initial_state `(B, H, D_k, D_v)`. Returns `(o (B, H, N, D_v),
    final state or None)`. `kernel`: the function to call with fla's signature (default: fla's chunk
    kernel; tests pass fla's pure-torch `naive_chunk_*` references, which run on CPU)."""
    if kernel is None:
        mod, _ = load(OPS[op][0])
        kernel = getattr(mod, OPS[op][1])
    kwargs = {"scale": scale, "initial_state": None if initial_state is None else initial_state.float(),
              "output_final_state": output_final_state}
    if g is not None:
        kwargs["g"] = _t(g)
    if beta is not None:
        kwargs["beta"] = _t(beta)
    o, state = kernel(_t(q), _t(k), _t(v), **kwargs)
    return _t(o), state
