"""Flowformer flow attention (Wu et al., 2022, "Flowformer: Linearizing Transformers with Conservation
Flows"), O(N D^2).

phi = sigmoid on q and k; every dot product is taken between eps-shifted vectors, as in the public code
(`(a + eps) . (b + eps)`). Non-causal, with N queries and M keys:

    I_i = 1 / (phi(q_i) . sum_j phi(k_j))                  incoming flow of sink i
    O_j = 1 / (phi(k_j) . sum_i phi(q_i))                  outgoing flow of source j
    Î_i = phi(q_i) . sum_j phi(k_j) O_j                     conserved incoming flow
    Ô_j = clamp(phi(k_j) . sum_i phi(q_i) I_i, -c, c)       conserved outgoing flow
    A_i = sigmoid(Î_i N / M),  C_j = M softmax_j(Ô_j)       allocation, competition
    o_i = A_i (phi(q_i) I_i) . sum_j phi(k_j) (C_j v_j)^T

Causal: prefix sums with counts n_i = i (1-based): `I_i = n_i / (phi(q_i) . sum_{j<=i} phi(k_j))`,
`O_j = n_j / (phi(k_j) . sum_{i<=j} phi(q_i))`, `Î_i = phi(q_i) . sum_{j<=i} phi(k_j) O_j / n_i`,
`Ô_j = clamp(phi(k_j) . sum_{i<=j} phi(q_i) I_i / n_j, -c, c)`, `A_i = sigmoid(Î_i)`,
`C_j = n_j e^{Ô_j} / sum_{l<=j} e^{Ô_l}`, `o_i = A_i (phi(q_i) I_i / n_i) . sum_{j<=i} phi(k_j) (C_j v_j)^T`:
the prefix dot products (elementwise prefix sums, or for long inputs causal linear attention with a
width-1 value: matmuls instead of D-wide prefix sums), then causal linear attention through the chunk
engine. The state (all
the running sums and the count) is O(D^2): `FlowformerState`, advanced one token by `flowformer_step`.
Public codes clamp at c = 1 and c = 5 (`clamp`).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..validate import check_qkv
from . import recurrent as _rec
from .ops import _check_qkv, _check_shape, _compute_dtype, _run


class FlowformerState(NamedTuple):
    """Running sums of causal flow attention: kv = sum phi(k) (C v)^T `(B, H, D, D_v)`; k_sum = sum phi(k),
    q_sum = sum phi(q), ko_sum = sum phi(k) O, qi_sum = sum phi(q) I `(B, H, D)`; exp_sum = sum e^{Ô}
    `(B, H)`; count: tokens seen (int)."""

    kv: torch.Tensor
    k_sum: torch.Tensor
    q_sum: torch.Tensor
    ko_sum: torch.Tensor
    qi_sum: torch.Tensor
    exp_sum: torch.Tensor
    count: int


def _dot(a, b, eps):
    return ((a + eps) * (b + eps)).sum(-1)


def _check_scalars(clamp, eps):
    for name, x in (("clamp", clamp), ("eps", eps)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite float >= 0, got {x!r}")
    if clamp == 0:
        raise ValueError("clamp must be > 0, got 0")
    return float(clamp), float(eps)


def _state(state, name, q, V, dt):
    B, H, D = q.shape[0], q.shape[1], q.shape[-1]
    if state is None:
        z = q.new_zeros(B, H, D, dtype=dt)
        return FlowformerState(q.new_zeros(B, H, D, V, dtype=dt), z, z, z, z, q.new_zeros(B, H, dtype=dt), 0)
    if not isinstance(state, FlowformerState):
        raise TypeError(f"{name} must be a FlowformerState or None, got {type(state).__name__}")
    shapes = {"kv": ((B, H, D, V), "(B, H, D, D_v)"), "exp_sum": ((B, H), "(B, H)")}
    for field in ("kv", "k_sum", "q_sum", "ko_sum", "qi_sum", "exp_sum"):
        shape, desc = shapes.get(field, ((B, H, D), "(B, H, D)"))
        _check_shape(f"{name}.{field}", getattr(state, field), shape, desc, q)
    if isinstance(state.count, bool) or not isinstance(state.count, int) or state.count < 0:
        raise ValueError(f"{name}.count must be an int >= 0, got {state.count!r}")
    return FlowformerState(*(x.to(dt) for x in state[:6]), state.count)


# Above this many elements in q (B H N D), the prefix dot products run as matmuls (`_prefix_dot_matmul`);
# below it the D-wide prefix sums stay in cache and are cheaper (`_prefix_dot_cumsum`). Measured on the
# 2-core CPU, H=8, D=64, 2 threads: N=4096 (2^21 elements) forward 38 vs 57 ms, forward+backward 113 vs
# 212 ms for cumsum vs matmul; N=16384 forward 461 vs 283 ms (fwd+bwd even).
PREFIX_MATMUL_MIN = 1 << 22


def _prefix_dot(a, b, s0, eps):
    """`(a_i + eps) . (s0 + sum_{j<=i} b_j + eps)` for every i. a, b `(B, H, N, D)`, s0 `(B, H, D)`.
    Returns the dots `(B, H, N)` and the final sum `s0 + sum_j b_j` `(B, H, D)`."""
    fn = _prefix_dot_matmul if a.numel() > PREFIX_MATMUL_MIN else _prefix_dot_cumsum
    return fn(a, b, s0, eps)


def _prefix_dot_cumsum(a, b, s0, eps):
    """The D-wide prefix sums, then the dot products (elementwise)."""
    prefix = s0[:, :, None] + b.cumsum(2)
    return _dot(a, prefix, eps), prefix[:, :, -1]


def _prefix_dot_matmul(a, b, s0, eps):
    """Without the D-wide prefix sums: `a_i . (s0 + sum b_j)` is causal linear attention with a width-1
    value (matmuls in the chunk engine); the eps terms are scalar prefix sums."""
    ones = b.new_ones(b.shape[:-1] + (1,))
    o, s = _run(a, b, ones, scale=1.0, initial_state=s0[..., None], output_final_state=True, mode="chunk",
                chunk_size=64)
    total = s0.sum(-1, keepdim=True) + b.sum(-1).cumsum(2)                        # sum_d of the prefix sums
    dots = o[..., 0] + eps * total + eps * a.sum(-1) + a.shape[-1] * eps * eps
    return dots, s[..., 0]


def _causal(q, k, v, clamp, eps, st: FlowformerState):
    """q, k already through phi; everything in the compute dtype. Returns (o, state)."""
    N = q.shape[2]
    n = torch.arange(st.count + 1, st.count + N + 1, dtype=q.dtype, device=q.device)
    qk, k_sum = _prefix_dot(q, k, st.k_sum, eps)
    kq, q_sum = _prefix_dot(k, q, st.q_sum, eps)
    inc, out = n / qk, n / kq                                                     # I, O
    sink, ko_sum = _prefix_dot(q, k * out[..., None], st.ko_sum, eps)
    source, qi_sum = _prefix_dot(k, q * inc[..., None], st.qi_sum, eps)
    alloc = torch.sigmoid(sink / n)                                               # A = sigmoid(Î)
    src = torch.exp((source / n).clamp(-clamp, clamp))                            # e^{Ô}
    exp_sum = st.exp_sum[:, :, None] + src.cumsum(2)
    comp = n * src / exp_sum                                                      # C
    o, kv = _run(q * (inc / n)[..., None], k, v * comp[..., None], scale=1.0, initial_state=st.kv,
                 output_final_state=True, mode="chunk", chunk_size=64)
    o = o * alloc[..., None]
    return o, FlowformerState(kv, k_sum, q_sum, ko_sum, qi_sum, exp_sum[:, :, -1], st.count + N)


def _noncausal(q, k, v, clamp, eps):
    N, M = q.shape[2], k.shape[2]
    inc = 1.0 / _dot(q, k.sum(2, keepdim=True), eps)
    out = 1.0 / _dot(k, q.sum(2, keepdim=True), eps)
    conserved_sink = _dot(q, (k * out[..., None]).sum(2, keepdim=True), eps)
    conserved_src = _dot(k, (q * inc[..., None]).sum(2, keepdim=True), eps).clamp(-clamp, clamp)
    alloc = torch.sigmoid(conserved_sink * (N / M))
    comp = torch.softmax(conserved_src, -1) * M
    kv = k.transpose(-1, -2) @ (v * comp[..., None])
    return (q * inc[..., None]) @ kv * alloc[..., None]


def flowformer(q, k, v, *, causal: bool = True, clamp: float = 1.0, eps: float = 1e-6, initial_state=None,
               output_final_state: bool = False):
    """Flow attention (see the module docstring). q `(B, H, N, D)`, k `(B, H, M, D)`, v `(B, H, M, D_v)`
    (M = N when causal); sigmoid is applied to q and k here. clamp: c of the conserved outgoing flow;
    eps: the shift inside every dot product. Causal calls take and return a `FlowformerState`
    (`initial_state`, `output_final_state=True` -> `(o, state)`) to continue a sequence.
    Returns o `(B, H, N, D_v)` in q's dtype."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    clamp, eps = _check_scalars(clamp, eps)
    if causal:
        _check_qkv(q, k, v)
    else:
        check_qkv(q, k, v)
        if initial_state is not None or output_final_state:
            raise ValueError("initial_state / output_final_state need causal=True (the non-causal form has no state)")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k must have q's number of heads {q.shape[1]} (flow attention sums over each head's "
                         f"queries: no grouped-query heads), got {k.shape[1]}")
    dt = _compute_dtype(q)
    fq, fk, vv = torch.sigmoid(q.to(dt)), torch.sigmoid(k.to(dt)), v.to(dt)
    if not causal:
        return _noncausal(fq, fk, vv, clamp, eps).to(q.dtype)
    o, st = _causal(fq, fk, vv, clamp, eps, _state(initial_state, "initial_state", q, v.shape[-1], dt))
    o = o.to(q.dtype)
    return (o, st) if output_final_state else o


def flowformer_step(q_t, k_t, v_t, state=None, *, clamp: float = 1.0, eps: float = 1e-6):
    """One causal token: q_t, k_t `(B, H, D)`, v_t `(B, H, D_v)`, state a `FlowformerState` or None.
    Returns `(o_t (B, H, D_v), FlowformerState)`; the cost does not grow with the tokens seen."""
    _check_qkv(q_t, k_t, v_t, step=True)
    if k_t.shape[1] != q_t.shape[1]:
        raise ValueError(f"k_t must have q_t's number of heads {q_t.shape[1]}, got {k_t.shape[1]}")
    clamp, eps = _check_scalars(clamp, eps)
    dt = _compute_dtype(q_t)
    st = _state(state, "state", q_t, v_t.shape[-1], dt)
    q, k, v = torch.sigmoid(q_t.to(dt)), torch.sigmoid(k_t.to(dt)), v_t.to(dt)
    n = float(st.count + 1)
    k_sum, q_sum = st.k_sum + k, st.q_sum + q
    inc, out = n / _dot(q, k_sum, eps), n / _dot(k, q_sum, eps)
    ko_sum, qi_sum = st.ko_sum + k * out[..., None], st.qi_sum + q * inc[..., None]
    alloc = torch.sigmoid(_dot(q, ko_sum, eps) / n)
    src = torch.exp((_dot(k, qi_sum, eps) / n).clamp(-clamp, clamp))
    exp_sum = st.exp_sum + src
    comp = n * src / exp_sum
    o, kv = _rec.step((q * (inc / n)[..., None])[:, :, None], k, v * comp[..., None], st.kv, 1.0)
    o = o[:, :, 0] * alloc[..., None]
    return o.to(q_t.dtype), FlowformerState(kv, k_sum, q_sum, ko_sum, qi_sum, exp_sum, st.count + 1)
