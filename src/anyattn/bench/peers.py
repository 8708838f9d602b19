"""Peers that several workloads time against: compiled FlexAttention (part of torch), and the FLOP
count of attention. Peers are optional: a missing one is reported as missing, never faked."""
from __future__ import annotations

import time
from typing import Callable

import torch

from ..softmax.flex import RECOMPILE_LIMIT, compiled_flex_attention
from .case import Case
from .device import bench_device


def attention_flops(B, H, N_q, N_k, D, D_v, causal=False):
    """Useful FLOPs of softmax attention: two matmuls of `2 N_q N_k D` each, halved for causal."""
    f = 2.0 * B * H * N_q * N_k * (D + D_v)
    return f / 2 if causal else f


def add_flex(case: Case, n_q: int, n_k: int, *, mask_mod: Callable | None = None,
             score_mod: Callable | None = None, prepare: Callable | None = None) -> None:
    """Add compiled FlexAttention as contender "flex" of `case`.

    mask_mod `(b, h, q_idx, kv_idx) -> bool` becomes a block mask; score_mod(inputs) returns the
    score_mod for these inputs (or None); prepare(inputs) -> (q, k, v) in `(B, H, N, D)` (default:
    inputs["q"], ["k"], ["v"]). The block mask and the compilation happen on the first call, whose
    time is reported in `case.setup_seconds["flex"]`, not in the timings. Forward only on CPU (torch's
    compiled CPU kernel is inference only). The compiled function is the one method `flex` uses
    (`anyattn.softmax.flex`); the peer differs in building its block mask the way users do, with
    `create_block_mask(mask_mod)`.
    """
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as e:  # pragma: no cover - torch < 2.5
        case.missing["flex"] = f"FlexAttention not importable: {e}"
        return
    prepare = prepare or (lambda x: (x["q"], x["k"], x["v"]))
    state = {"compile_s": None, "fn": None, "block_mask": None}

    def fn(x):
        # one compiled function serves every case and dtype of the process: past torch's default of 8
        # recompilations dynamo would fall back to the eager path, which materializes the N x N scores
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if state["fn"] is None:
                t0 = time.perf_counter()
                q, _, _ = prepare(x)
                if mask_mod is not None:
                    state["block_mask"] = create_block_mask(mask_mod, None, None, n_q, n_k, device=str(q.device))
                state["fn"] = compiled_flex_attention()
                with torch.no_grad():
                    state["fn"](*(t.detach() for t in prepare(x)), score_mod=score_mod(x) if score_mod else None,
                                block_mask=state["block_mask"])
                state["compile_s"] = time.perf_counter() - t0
            return state["fn"](*prepare(x), score_mod=score_mod(x) if score_mod else None,
                               block_mask=state["block_mask"])

    case.contenders["flex"] = fn
    if bench_device().type == "cpu":
        case.forward_only["flex"] = "FlexAttention has no backward on CPU"
    case.setup_seconds["flex"] = lambda: state["compile_s"]
