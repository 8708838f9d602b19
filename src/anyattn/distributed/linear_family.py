"""Context-parallel linear family, SSD and selective scan: `ad.linear`, `ad.ssd`, `ad.selective_scan`.

Each takes the single-process op's arguments in the same order, with this rank's rows of every
per-token tensor (sequence dim 2 for the linear family, 1 for SSD's `(B, L, H, P)`, the last for the
selective scan's `(B, D, L)`), plus `layout=` (an `ad.Layout`), `group=` and `algo=`:
"summary", "ulysses", "pipeline" (see `algorithms.py`; "pipeline:P" fixes its number of blocks) or
"auto" (the cost model of `cost.py`).

`initial_state` enters at global position 0 (rank 0's value is used; pass it on every rank, or None
on every rank) and its gradient arrives on rank 0 (zero elsewhere). The final state is the state
after the last global token, returned on every rank; its gradient is the sum of every rank's
cotangents. Gradients of replicated parameters (retention's per-head `g`, `slopes`, SSD's `A`, `D`,
`dt_bias`, the scan's `A`, `D`, `delta_bias`) are this rank's part: all-reduce them (sum), as for any
replicated parameter.
"""
from __future__ import annotations

import inspect

import torch

from .. import linear as _L
from ..linear.feature_maps import CosformerFeatures, resolve_feature_map
from ..linear.mom import _check as _mom_check
from ..linear.ops import (MODES, _check_beta, _check_common, _check_g, _check_qkv, _check_shape, _compute_dtype,
                          _features, _lightning_g, _query_groups)
from ..ssm import _checks as _sc
from ..ssm.selective_scan import _check_bc
from ..ssm.ssd import _finish_ssd, _prepare_ssd
from ..validate import check_positive_int, check_scale
from . import algorithms
from .comm import as_comm
from .layout import check_layout
from .problems import LinearProblem, MoMProblem, ScanProblem
from .state import runs

ALGOS = ("auto", "summary", "ulysses", "pipeline")
OPS = ("linear_attention", "retention", "lightning", "gla", "delta_rule", "gated_delta_rule", "kda", "mom")
_GATES = {"retention": ("head", False), "lightning": ("head", False), "gla": ("vector", False),
          "delta_rule": (None, True), "gated_delta_rule": ("scalar", True), "kda": ("vector", True)}


def _resolve_op(op):
    if isinstance(op, str):
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)} (or the function itself), got {op!r}")
        return op, getattr(_L, op)
    for name in OPS:
        if op is getattr(_L, name):
            return name, op
    raise TypeError(f"op must be the name or the function of an anyattn.linear op {list(OPS)}, got {op!r}")


def _check_algo(algo):
    """One of ALGOS, or "pipeline:P" (the pipeline with P blocks instead of the cost model's choice)."""
    if algo in ALGOS:
        return
    if isinstance(algo, str) and algo.startswith("pipeline:") and algo[9:].isdigit() and int(algo[9:]) >= 1:
        return
    raise ValueError(f"algo must be one of {list(ALGOS)} or 'pipeline:P' (P >= 1 blocks), got {algo!r}")


def _check_flag(name, x):
    if not isinstance(x, bool):
        raise TypeError(f"{name} must be a bool, got {type(x).__name__}")


# -------------------------------------------------------------------------------------------- dispatch
def run_problem(problem, layout, comm, S0, algo: str, want_final: bool):
    """Run `problem` over the ranks with `algo` ("auto": the cost model's choice). Returns (o, S)."""
    if comm.world_size == 1:
        return problem.run(problem.values(), S0)
    if algo == "auto":
        from .cost import choose
        algo = choose(problem, layout, comm.world_size)
    if algo == "summary" and len(runs(layout, comm.rank)) > 2:
        raise ValueError(f"algo='summary' summarizes each contiguous run of a rank's rows; the {layout.kind!r} "
                         "layout has one run per row: use algo='ulysses' (any layout) or a contiguous / zigzag "
                         "layout")
    if algo.startswith("pipeline"):
        from .cost import pipeline_parts
        parts = int(algo[9:]) if ":" in algo else pipeline_parts(problem, layout, comm.world_size)
        return algorithms.pipeline(problem, layout, comm, S0, want_final, parts=parts)
    fn = algorithms.summary if algo == "summary" else algorithms.ulysses
    return fn(problem, layout, comm, S0, want_final)


# -------------------------------------------------------------------------------------------- builders
def _linear_attention(p, layout, rank, initial_state, output_final_state):
    """Features on global positions (cosFormer's angle uses them), then identity-feature linear attention."""
    q, k, v = p["q"], p["k"], p["v"]
    _check_qkv(q, k, v)
    _check_flag("causal", p["causal"])
    _check_flag("normalize", p["normalize"])
    if p["mode"] not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {p['mode']!r}")
    fm, opts = p["feature_map"], dict(p["feature_options"] or {})
    if fm == "cosformer":
        opts.setdefault("max_len", layout.n_global)
    elif isinstance(fm, CosformerFeatures) and fm.max_len is None:
        fm = CosformerFeatures(layout.n_global)
    fmap = resolve_feature_map(fm, q.shape[-1], opts)
    dt = _compute_dtype(q)
    if getattr(fmap, "self_bias", None) is not None:
        raise ValueError("ad.linear does not run a feature map with a self_bias numerator (EcoFormer's "
                         "official_bias=True): use official_bias=False")
    fq, fk, _ = zip(*[_features(q.narrow(2, lo, n), k.narrow(2, lo, n), fmap, None, g0)
                      for lo, n, g0 in runs(layout, rank)])
    fq, fk = torch.cat(fq, 2).to(dt), torch.cat(fk, 2).to(dt)
    vv = v.to(dt)
    if p["normalize"]:
        vv = torch.cat([vv, vv.new_ones(*vv.shape[:-1], 1)], -1)
    scale = _check_common(q, k, v, p["scale"], initial_state, p["mode"], p["chunk_size"], output_final_state,
                          (fq.shape[-1], vv.shape[-1]))
    eps = p["eps"]

    def post(o):
        if p["normalize"]:
            o = o[..., :-1] / (o[..., -1:] + eps)
        return o.to(q.dtype)

    S0 = None if initial_state is None else initial_state.to(dt)
    if not p["causal"]:
        def direct(comm):
            S = fk.transpose(-1, -2) @ vv
            S = comm.all_reduce(S) if comm.world_size > 1 else S
            if S0 is not None:
                S = S + (comm.broadcast(S0, 0) if comm.world_size > 1 else S0)
            o = scale * (_query_groups(fq, k.shape[1]) @ S[:, :, None])
            return o.reshape(*q.shape[:-1], vv.shape[-1]), S
        return None, None, post, direct
    problem = LinearProblem(fq, fk, vv, scale=scale, mode=p["mode"], chunk_size=p["chunk_size"])
    return problem, S0, post, None


def _gated(name, p, initial_state, output_final_state):
    q, k, v = p["q"], p["k"], p["v"]
    _check_qkv(q, k, v)
    kind, delta = _GATES[name]
    g = beta = None
    if name == "lightning":
        g = _check_g("slopes", _lightning_g(k, p["slopes"]), k, "head")
    elif kind is not None:
        g = _check_g("g", p["g"], k, kind)
    if delta:
        beta = _check_beta("beta", p["beta"], k)
    scale = _check_common(q, k, v, p["scale"], initial_state, p["mode"], p["chunk_size"], output_final_state)
    # inputs keep their dtype (Ulysses moves bf16 as bf16); the ops compute in fp32 / fp64 and so does the fold
    problem = LinearProblem(q, k, v, g, beta, scale=scale, mode=p["mode"], chunk_size=p["chunk_size"])
    S0 = None if initial_state is None else initial_state.to(_compute_dtype(q))
    return problem, S0, (lambda o: o.to(q.dtype)), None


def _mom(p, initial_state, output_final_state):
    q, k, v, g, beta, w = (p[n] for n in ("q", "k", "v", "g", "beta", "weights"))
    _mom_check(q, k, v, g, beta, w, step=False)
    if p["mode"] not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {p['mode']!r}")
    check_positive_int("chunk_size", p["chunk_size"])
    _check_flag("output_final_state", output_final_state)
    B, H, M, _, K = k.shape
    dt = _compute_dtype(q)
    S0 = None
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (B, H, M, K, v.shape[-1]), "(B, H, M, D_k, D_v)", q)
        S0 = initial_state.to(dt)
    problem = MoMProblem(q, k, v, g, beta, w, scale=check_scale(p["scale"], K), mode=p["mode"],
                         chunk_size=p["chunk_size"])
    return problem, S0, (lambda o: o.to(q.dtype)), None


# -------------------------------------------------------------------------------------------- public
def _prepare(op, q, k, v, args, kwargs, layout, comm, algo, initial_state, output_final_state):
    name, fn = _resolve_op(op)
    _check_algo(algo)
    _check_flag("output_final_state", output_final_state)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a (B, H, n_local, D) tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    check_layout(layout, comm.world_size, q.shape[2], "q")
    try:
        bound = inspect.signature(fn).bind(q, k, v, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"arguments do not match anyattn.linear.{name}: {e}") from None
    bound.apply_defaults()
    p = bound.arguments
    if name == "linear_attention":
        return _linear_attention(p, layout, comm.rank, initial_state, output_final_state)
    if name == "mom":
        return _mom(p, initial_state, output_final_state)
    return _gated(name, p, initial_state, output_final_state)


def linear(op, q, k, v, *args, layout, group=None, algo: str = "auto", initial_state=None,
           output_final_state: bool = False, **kwargs):
    """Context-parallel `anyattn.linear` op over sequence shards.

    op: a name in `OPS` or the function (`anyattn.linear.gated_delta_rule`, ...). q, k, v and the
    per-token gates / beta / router weights: this rank's rows (`(B, H, n_local, D)`, MoM's k, v, g,
    beta `(B, H, M, n_local, .)`); other arguments as the op takes them (`feature_map`, `slopes`,
    `scale`, `mode`, `chunk_size`, ...). layout: an `ad.Layout` of the global sequence. algo:
    "summary", "ulysses", "pipeline" or "auto". Returns `o` (this rank's rows), or `(o, final_state)`
    with `output_final_state=True` (the same final state on every rank).
    """
    comm = as_comm(group)
    problem, S0, post, direct = _prepare(op, q, k, v, args, kwargs, layout, comm, algo, initial_state,
                                         output_final_state)
    if direct is not None:
        o, S = direct(comm)
    else:
        o, S = run_problem(problem, layout, comm, S0, algo, output_final_state)
    o = post(o)
    return (o, S) if output_final_state else o


def explain_linear(op, q, k, v, *args, layout, group=None, backward: bool | None = None, machine=None, **kwargs):
    """What `algo="auto"` of `linear(op, q, k, v, *args, layout=..., **kwargs)` picks on this rank's inputs:
    `{"algo": ..., "estimates": {algo: seconds per rank}, "profile": ...}` from `cost.estimate` (no
    communication). backward: estimate forward+backward (default: whether an input requires grad)."""
    from . import cost
    comm = as_comm(group)
    problem, _, _, direct = _prepare(op, q, k, v, args, kwargs, layout, comm, "auto", None, False)
    if direct is not None:
        return {"algo": "all_reduce", "estimates": {}, "profile": None}
    if backward is None:
        backward = any(a.value.requires_grad for a in problem.args.values())
    W = comm.world_size
    machine = machine or cost.default_machine(problem)
    prof = cost.profile(problem)
    est = cost.estimate(prof, W, layout.kind, machine, backward, len(runs(layout, 0)))
    return {"algo": "local" if W == 1 else cost.choose(problem, layout, W, machine, backward), "estimates": est,
            "profile": prof}


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus: bool = False, *, layout, group=None,
        algo: str = "auto", initial_state=None, output_final_state: bool = False, mode: str = "chunk",
        chunk_size: int = 64):
    """Context-parallel `anyattn.ssm.ssd` (Mamba-2): x `(B, n_local, H, P)`, dt `(B, n_local, H)`, B, C
    `(B, n_local, G, N)` this rank's rows; A, D, dt_bias replicated. Computed as retention (as the
    single-process op is), so every algorithm of `ad.linear` applies. Returns y `(B, n_local, H, P)`,
    or `(y, final_state (B, H, P, N))`."""
    comm = as_comm(group)
    _check_algo(algo)
    _sc.check_mode(mode)
    check_positive_int("chunk_size", chunk_size)
    _check_flag("output_final_state", output_final_state)
    _sc.check_tensor("x", x, 4)
    check_layout(layout, comm.world_size, x.shape[1], "x")
    p = _prepare_ssd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, initial_state)
    problem = LinearProblem(p["q"], p["k"], p["v"], p["g"], scale=1.0, mode=mode, chunk_size=chunk_size)
    o, S = run_problem(problem, layout, comm, p["S0"], algo, output_final_state)
    y = _finish_ssd(o, p)
    return (y, S.transpose(-1, -2)) if output_final_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus: bool = False, *, layout,
                   group=None, algo: str = "auto", initial_state=None, output_final_state: bool = False,
                   return_last_state: bool | None = None, mode: str = "chunk", chunk_size: int = 32,
                   compile="auto"):
    """Context-parallel `anyattn.ssm.selective_scan` (Mamba): u, delta, z `(B, D, n_local)`, B, C
    `(B, N, n_local)` or `(B, G, N, n_local)` this rank's rows; A `(D, N)`, D, delta_bias replicated.
    Channels play the heads (Ulysses and the pipeline split them). Returns y `(B, D, n_local)`, or
    `(y, last_state (B, D, N))`."""
    comm = as_comm(group)
    _check_algo(algo)
    if return_last_state is not None:
        output_final_state = bool(return_last_state)
    _check_flag("output_final_state", output_final_state)
    _sc.check_tensor("u", u, 3)
    _sc.check_float("u", u)
    Bsz, Dm, L = u.shape
    check_layout(layout, comm.world_size, L, "u")
    _sc.check_float("delta", delta, u)
    _sc.check_shape("delta", delta, (Bsz, Dm, L), "(B, D, L)")
    _sc.check_tensor("A", A)
    _sc.check_float("A", A, u)
    if A.dim() != 2 or A.shape[0] != Dm or A.shape[1] == 0:
        raise ValueError(f"A must have shape (D, N) with D = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    Bg, Cg = _check_bc("B", B, u, Bsz, Dm, N, L), _check_bc("C", C, u, Bsz, Dm, N, L)
    if Bg.shape[1] != Cg.shape[1]:
        raise ValueError(f"B and C must have the same number of groups G, got B: {Bg.shape[1]}, C: {Cg.shape[1]}")
    for nm, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None:
            _sc.check_float(nm, X, u)
            _sc.check_shape(nm, X, (Dm,), "(D,)")
    if z is not None:
        _sc.check_float("z", z, u)
        _sc.check_shape("z", z, (Bsz, Dm, L), "(B, D, L)")
    cd = _sc.compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    S0 = None
    if initial_state is not None:
        _sc.check_float("initial_state", initial_state, u)
        _sc.check_shape("initial_state", initial_state, (Bsz, Dm, N), "(B, D, N)")
        S0 = initial_state.to(cd)
    _sc.check_mode(mode)
    check_positive_int("chunk_size", chunk_size)
    problem = ScanProblem(u.to(cd), delta, A, B, C, D, z, delta_bias, delta_softplus, mode=mode,
                          chunk_size=chunk_size, compile=compile)
    y, S = run_problem(problem, layout, comm, S0, algo, output_final_state)
    y = y.to(u.dtype)
    return (y, S) if output_final_state else y
