"""`ad.attention`: exact softmax attention over a sequence sharded across ranks (context parallelism).

Algorithms (`algo=`):
- "ring": K/V blocks travel the ring, communication overlapped with compute; memory O(n_local) per
  rank; load balance follows the layout (use "zigzag" for causal masks);
- "allgather": one all_gather of K/V, then the same block loop; memory O(N); fewest messages;
- "ulysses": all-to-all sequence <-> heads, the unsharded attention on H/W heads; needs H % W == 0;
  every rank does the same work whatever the mask;
- "auto": see `choose_algo` (and `explain_attention`, which says why).

Masks and biases are the `anyattn.masks` / `anyattn.biases` specs of the *global* problem (evaluated at
global positions: `layout.positions(rank)`), including callables and dense tensors of global size.
Empty blocks are skipped while every rank still takes part in every message. Partial results merge in
float32 (float64 for float64 inputs). Bias parameters are shared by the ranks and each rank's backward
gives its share of their gradients: sum them over ranks (`all_reduce_grads`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..biases import as_bias
from ..masks import as_mask
from ..validate import check_qkv, check_scale
from .blocks import Problem
from .comm import as_comm
from .layout import check_layout
from .ring import KVBlockAttention, heads_per_pass
from .ulysses import kv_replication, ulysses_attention

ALGOS = ("auto", "ring", "allgather", "ulysses")
ALLGATHER_MAX_BYTES = 32 << 20  # auto gathers K/V when all of it fits in this many bytes per rank


@dataclass(frozen=True)
class AlgoChoice:
    algo: str
    reason: str

    def __str__(self):
        return f"{self.algo}: {self.reason}"


def choose_algo(W: int, layout, B: int, H: int, H_kv: int, D: int, D_v: int, element_size: int) -> AlgoChoice:
    """The rule behind `algo="auto"` (per-rank bytes b(x) of the local tensors, f = K/V head replication):

    1. W == 1: "ring" (no communication: the local engines on the whole problem);
    2. H % W == 0 and f <= 2: "ulysses": it sends (W-1)/W (b(q) + f b(kv) + b(out)) per rank, a constant
       while ring sends (W-1) b(kv) per pass; every rank does the same work whatever the mask and
       layout; the local problem runs the best single-process engine (e.g. SDPA's fused causal kernel);
    3. all K/V (W b(kv)) at most ALLGATHER_MAX_BYTES: "allgather" (one collective instead of W-1
       latency-bound steps);
    4. otherwise "ring" (memory O(n_local); pick the "zigzag" layout for causal masks).
    """
    n = layout.n_local
    kv = B * H_kv * n * (D + D_v) * element_size
    if W == 1:
        return AlgoChoice("ring", "one rank: no communication, the local engines run the whole problem")
    f = kv_replication(H_kv, W)
    if H % W == 0 and f <= 2:
        rep = "" if f == 1 else f" (K/V heads replicated x{f} to split over {W} ranks)"
        return AlgoChoice("ulysses", f"H = {H} splits over W = {W} ranks{rep}: one all-to-all each way moves "
                                     f"(W-1)/W of q, K/V and out per rank whatever W, every rank does the same "
                                     "work for any mask, and each runs the unsharded engine on its heads")
    if W * kv <= ALLGATHER_MAX_BYTES:
        return AlgoChoice("allgather", f"H = {H} does not split over W = {W}; all K/V ({W * kv / 2**20:.1f} MiB) "
                                       "fits: one all_gather instead of W-1 ring steps")
    return AlgoChoice("ring", f"H = {H} does not split over W = {W} and all K/V ({W * kv / 2**20:.0f} MiB) is "
                              "large: ring keeps O(n_local) memory and overlaps the transfers with compute")


def _validate(q, k, v, layout, comm, mask, bias, scale, algo, return_lse):
    shape = check_qkv(q, k, v)
    check_layout(layout, comm.world_size, shape.N_q, "q")
    if shape.N_k != shape.N_q:
        raise ValueError(f"k and v must hold the same local positions as q (n_local = {shape.N_q}), got {shape.N_k}")
    scale = check_scale(scale, shape.D)
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    mask, bias = as_mask(mask), as_bias(bias)
    N = layout.n_global
    if mask is not None:
        mask.validate(shape.B, shape.H, N, N, q.device)
    if bias is not None:
        bias.validate(shape.B, shape.H, N, N, q.device, q.dtype)
    return shape, scale, mask, bias


def attention(q, k, v, *, layout, group=None, mask=None, bias=None, scale=None, algo="auto", return_lse=False,
              kv_heads_per_pass=None):
    """Exact softmax attention of a sequence sharded over the ranks of `group`.

    q `(B, H, n_local, D)`, k `(B, H_kv, n_local, D)`, v `(B, H_kv, n_local, D_v)`: this rank's rows
    (global positions `layout.positions(rank)`; `ad.shard` cuts them), `H % H_kv == 0`.
    layout: an `ad.Layout` with `world_size` = the group's size. mask / bias: specs (or tensors /
    callables, as for `anyattn.attention`) of the global `(B, H, N, N)` problem, N = layout.n_global.
    scale: default `D ** -0.5`. algo: "auto", "ring", "allgather" or "ulysses" (`explain_attention` says
    what auto picks). kv_heads_per_pass: ring only, K/V heads per ring pass (default: blocks of about
    4 MiB).
    Returns out `(B, H, n_local, D_v)` in q's dtype, or `(out, lse)` with lse `(B, H, n_local)` (float32 for
    low-precision inputs). Rows with no allowed key give 0 and LSE -inf. Differentiable in q, k, v and
    the bias parameters (each rank's backward gives its share of the bias gradients: `all_reduce_grads`).
    """
    comm = as_comm(group)
    shape, scale, mask, bias = _validate(q, k, v, layout, comm, mask, bias, scale, algo, return_lse)
    W = comm.world_size
    work = torch.promote_types(q.dtype, torch.float32)
    if algo == "auto":
        algo = choose_algo(W, layout, shape.B, shape.H, shape.H_kv, shape.D, shape.D_v, q.element_size()).algo
    if algo == "ulysses":
        if shape.H % W != 0:
            raise ValueError(f"algo='ulysses' needs the number of heads H = {shape.H} divisible by the world size "
                             f"W = {W}")
        out, lse = ulysses_attention(comm, layout, q, k, v, mask, bias, scale, return_lse)
        return (out, lse) if return_lse else out
    if kv_heads_per_pass is None:
        per = heads_per_pass(shape.B, shape.H_kv, shape.N_q, shape.D, shape.D_v, q.element_size()) \
            if algo == "ring" else shape.H_kv
    else:
        if isinstance(kv_heads_per_pass, bool) or not isinstance(kv_heads_per_pass, int) or kv_heads_per_pass < 1:
            raise ValueError(f"kv_heads_per_pass must be an int >= 1, got {kv_heads_per_pass!r}")
        per = kv_heads_per_pass
    prob = Problem(layout, mask, bias, scale, shape.B, shape.H, shape.H_kv, shape.D, shape.D_v, q.device, work)
    bias_tensors = tuple(bias.tensors()) if bias is not None else ()
    out, lse = KVBlockAttention.apply(prob, comm, algo, per, q, k, v, *bias_tensors)
    return (out, lse) if return_lse else out


def explain_attention(q, k, v, *, layout, group=None, mask=None, bias=None, scale=None) -> AlgoChoice:
    """What `algo="auto"` picks for these (local) inputs and why."""
    comm = as_comm(group)
    shape, _, mask, bias = _validate(q, k, v, layout, comm, mask, bias, scale, "auto", False)
    return choose_algo(comm.world_size, layout, shape.B, shape.H, shape.H_kv, shape.D, shape.D_v, q.element_size())


def all_reduce_grads(params, group=None) -> None:
    """Sum the `.grad` of each tensor in `params` (a bias spec, a module, or tensors) over the ranks, in
    place: what bias parameters shared by the ranks need after a sharded backward."""
    from ..biases import Bias
    comm = as_comm(group)
    if isinstance(params, Bias):
        params = params.tensors()
    elif isinstance(params, torch.nn.Module):
        params = list(params.parameters())
    elif isinstance(params, torch.Tensor):
        params = [params]
    for p in params:
        if p.grad is not None:
            p.grad.copy_(comm.all_reduce(p.grad.detach()))
