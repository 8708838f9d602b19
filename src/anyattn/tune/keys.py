"""What the tune cache holds, and the keys it is looked up by.

Kinds (each `{key: {"value": ..., "measured": {candidate: ms}}}`):
- "softmax_route": value = the exact method `auto` uses for a class of requests
  (`route_key`: device, dtype, mask and bias kinds, log2 of N_q and N_k rounded, head dim, and whether
  gradients are wanted: a forward-only winner may lose forward+backward);
- "blocked_blocks": value = `[block_q, block_k]` of the blocked engine for a class (`blocks_key`);
- "neighborhood_tile": value = the query tile per axis for one neighborhood configuration
  (`neighborhood_key`);
- "linear_chunk": value = the chunk size of a linear-family op at a length (`chunk_key`): recorded for
  the chunk engines (a performance parameter: the result does not depend on it).
Keys match exactly: a request of another class keeps the built-in choice.
"""
from __future__ import annotations

import math

import torch

from .cache import entry


def _dev(device) -> str:
    return torch.device(device).type


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _b(n: int) -> int:
    """log2 of a length, rounded: the size class."""
    return round(math.log2(max(int(n), 1)))


def mask_kind(mask) -> str:
    return "none" if mask is None else type(mask).__name__


def _term_kind(t) -> str:
    kind = getattr(t, "kind", None)  # RelativePosition: "t5", "swin", "custom"
    return type(t).__name__ + (f":{kind}" if isinstance(kind, str) else "")


def bias_kind(bias) -> str:
    return "none" if bias is None else "+".join(sorted(_term_kind(t) for t in bias.terms()))


def route_key(device, dtype, mask, bias, n_q: int, n_k: int, d: int, grad: bool) -> str:
    return (f"{_dev(device)}|{_dt(dtype)}|mask={mask_kind(mask)}|bias={bias_kind(bias)}|Nq={_b(n_q)}|Nk={_b(n_k)}"
            f"|D={d}|grad={int(bool(grad))}")


def blocks_key(device, dtype, mask, n_q: int, n_k: int, grad: bool) -> str:
    return f"{_dev(device)}|{_dt(dtype)}|mask={mask_kind(mask)}|Nq={_b(n_q)}|Nk={_b(n_k)}|grad={int(bool(grad))}"


def neighborhood_key(shape, ks, ds, ss, cs, dtype, device) -> str:
    return (f"{_dev(device)}|{_dt(dtype)}|shape={list(shape)}|k={list(ks)}|d={list(ds)}|s={list(ss)}"
            f"|c={[int(c) for c in cs]}")


def chunk_key(op: str, device, dtype, n: int, grad: bool) -> str:
    return f"{_dev(device)}|{_dt(dtype)}|op={op}|N={_b(n)}|grad={int(bool(grad))}"


def request_grad(req) -> bool:
    """Whether the request will be differentiated: grad mode on and some input takes gradients."""
    if not torch.is_grad_enabled():
        return False
    ts = [req.q, req.k, req.v] + (list(req.bias.tensors()) if req.bias is not None else [])
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def _route_key(req) -> str:
    sh = req.shape
    return route_key(req.q.device, req.q.dtype, req.mask, req.bias, sh.N_q, sh.N_k, sh.D, request_grad(req))


def measured_route(req):
    """`(method, reason, record)` when the tune cache has a measured winner for this request's class and
    that method can run it exactly and precisely here; else None."""
    key = _route_key(req)
    rec = entry("softmax_route", key)
    if rec is None:
        return None
    from ..registry import get
    method = rec["value"]
    try:
        m = get(method)
    except ValueError:
        return None
    if not m.exact or m.supports(req) is not None:
        return None
    if method == "lowrank_bias" and not _lowrank_precise(req):
        return None
    times = sorted(((float(t), n) for n, t in rec.get("measured", {}).items()), key=lambda x: x[0])
    quoted = ", ".join(f"{n} {t:.1f} ms" for t, n in times)
    return method, f"measured fastest on this machine by `anyattn tune` ({key}): {quoted}", rec


def _lowrank_precise(req) -> bool:
    """lowrank_bias only where `auto`'s own rule would allow it: an exact low-rank form whose factor
    arithmetic stays within plan.MAX_FACTOR_SCORE_ERROR at this length."""
    from ..plan import MAX_FACTOR_SCORE_ERROR
    if req.bias is None:
        return False
    sh = req.shape
    if req.bias.exact_rank(req.mask, sh.N_q, sh.N_k) is None:
        return False
    err = sum(getattr(t, "factor_error", lambda n_k: 0.0)(sh.N_k) for t in req.bias.terms())
    return err <= MAX_FACTOR_SCORE_ERROR


def measured_blocks(req):
    """`(block_q, block_k)` measured for this request's class, or None."""
    sh = req.shape
    rec = entry("blocked_blocks", blocks_key(req.q.device, req.q.dtype, req.mask, sh.N_q, sh.N_k, request_grad(req)))
    if rec is None:
        return None
    bq, bk = rec["value"]
    return int(bq), int(bk)
