"""Cases of the context-parallel state-passing ops (linear family, MoM, SSD, selective scan), shared by the
thread and gloo tests: global float64 inputs, the single-process result with every gradient, and the
per-rank run (module-level functions, so gloo workers can import them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import anyattn.distributed as ad
from anyattn import linear as L
from anyattn import ssm

# name -> (op, kwargs); the op is an anyattn.linear name, "ssd" or "selective_scan"
OPS = {
    "linear_elu1": ("linear_attention", {"feature_map": "elu1"}),
    "linear_cosformer": ("linear_attention", {"feature_map": "cosformer"}),
    "linear_performer": ("linear_attention", {"feature_map": "performer", "feature_options": {"num_features": 6}}),
    "linear_normalize": ("linear_attention", {"feature_map": "elu1", "normalize": True}),
    "linear_noncausal": ("linear_attention", {"feature_map": "elu1", "causal": False}),
    "retention_head": ("retention", {}),
    "retention_token": ("retention", {}),
    "lightning": ("lightning", {}),
    "gla": ("gla", {}),
    "delta_rule": ("delta_rule", {}),
    "gated_delta_rule": ("gated_delta_rule", {}),
    "gated_delta_rule_gqa": ("gated_delta_rule", {}),
    "kda": ("kda", {}),
    "mom": ("mom", {}),
    "ssd": ("ssd", {"dt_softplus": True}),
    "selective_scan": ("selective_scan", {"delta_softplus": True}),
    "selective_scan_groups": ("selective_scan", {"delta_softplus": True}),
}


def make(name, B=2, H=4, N=24, D=4, dtype=torch.float64, seed=0):
    """Global inputs: `args` (positional, after the op), their sequence dims (None: replicated on every
    rank), the initial state and the op's kwargs."""
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64)

    op, kw = OPS[name]
    kw = dict(kw)
    if op == "ssd":
        P, G, Ns = D, 2, 3
        args = [r(B, N, H, P), r(B, N, H) * 0.5, -torch.rand(H, generator=g, dtype=torch.float64) - 0.2,
                r(B, N, G, Ns), r(B, N, G, Ns), r(H), r(B, N, H, P), r(H) * 0.1]
        return args, [1, 1, None, 1, 1, None, 1, None], r(B, H, P, Ns), kw
    if op == "selective_scan":
        Dm, Ns = H * 2, 3
        bc = (B, 2, Ns, N) if name.endswith("groups") else (B, Ns, N)
        bdim = len(bc) - 1
        args = [r(B, Dm, N), r(B, Dm, N) * 0.5, -torch.rand(Dm, Ns, generator=g, dtype=torch.float64) - 0.2,
                r(*bc), r(*bc), r(Dm), r(B, Dm, N), r(Dm) * 0.1]
        return args, [2, 2, None, bdim, bdim, None, 2, None], r(B, Dm, Ns), kw
    Hq = 2 * H if name.endswith("gqa") else H
    q, k, v = r(B, Hq, N, D), r(B, H, N, D), r(B, H, N, D)
    if op == "mom":
        M = 3
        k, v = r(B, H, M, N, D), r(B, H, M, N, D)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gm, beta = F.logsigmoid(r(B, H, M, N) + 2), torch.sigmoid(r(B, H, M, N))
        logits = r(B, N, M)
        top = logits.topk(2, dim=-1)
        w = torch.zeros_like(logits).scatter(-1, top.indices, top.values.softmax(-1))
        return [q, k, v, gm, beta, w], [2, 3, 3, 3, 3, 1], r(B, H, M, D, D), kw
    if op in ("delta_rule", "gated_delta_rule", "kda"):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    args, dims = [q, k, v], [2, 2, 2]
    if op == "retention":
        if name.endswith("head"):
            args.append(-torch.rand(H, generator=g, dtype=torch.float64) * 0.3 - 0.01)
            dims.append(None)
        else:
            args.append(F.logsigmoid(r(B, H, N) + 2))
            dims.append(2)
    elif op == "lightning":
        args.append(torch.rand(H, generator=g, dtype=torch.float64) * 0.3 + 0.01)
        dims.append(None)
    elif op in ("gla", "kda"):
        args.append(F.logsigmoid(r(B, H, N, D) + 2))
        dims.append(2)
    elif op == "gated_delta_rule":
        args.append(F.logsigmoid(r(B, H, N) + 2))
        dims.append(2)
    if op in ("delta_rule", "gated_delta_rule", "kda"):
        args.append(torch.sigmoid(r(B, H, N)))
        dims.append(2)
    fm = kw.get("feature_map")
    feats = {"cosformer": 2 * D, "performer": kw.get("feature_options", {}).get("num_features", D)}.get(fm, D)
    S0 = r(B, H, feats, D + 1 if kw.get("normalize") else D)
    return args, dims, (S0.abs() if kw.get("normalize") else S0), kw


def single(op, args, S0, kw):
    """The single-process op: (o, final state)."""
    if op == "ssd":
        return ssm.ssd(*args, initial_state=S0, output_final_state=True, **kw)
    if op == "selective_scan":
        return ssm.selective_scan(*args, initial_state=S0, output_final_state=True, **kw)
    return getattr(L, op)(*args, initial_state=S0, output_final_state=True, **kw)


def distributed(op, args, S0, kw, layout, comm, algo):
    if op == "ssd":
        return ad.ssd(*args, layout=layout, group=comm, algo=algo, initial_state=S0, output_final_state=True, **kw)
    if op == "selective_scan":
        return ad.selective_scan(*args, layout=layout, group=comm, algo=algo, initial_state=S0,
                                 output_final_state=True, **kw)
    return ad.linear(op, *args, layout=layout, group=comm, algo=algo, initial_state=S0, output_final_state=True,
                     **kw)


def cotangents(o_shape, S_shape, seed=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(o_shape, generator=g, dtype=torch.float64),
            torch.randn(S_shape, generator=g, dtype=torch.float64))


def reference(name, **sizes):
    """Single-process float64 outputs, final state and the gradients of every input and the initial state."""
    op = OPS[name][0]
    args, dims, S0, kw = make(name, **sizes)
    leaves = [a.clone().requires_grad_() for a in args] + [S0.clone().requires_grad_()]
    o, S = single(op, leaves[:-1], leaves[-1], kw)
    do, dS = cotangents(o.shape, S.shape)
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), leaves)
    return o.detach(), S.detach(), grads


def rank_run(comm, name, kind, W, algo, sizes=None, dtype=torch.float64):
    """One rank: shard, run, backward with the same cotangents (the final state's split over the ranks),
    then gather everything: outputs and sharded gradients unsharded, replicated gradients summed."""
    sizes = dict(sizes or {})
    op = OPS[name][0]
    args, dims, S0, kw = make(name, **sizes)
    N = args[0].shape[dims[0]]
    layout = ad.Layout(kind, W, N)
    rank = comm.rank
    local = [(ad.shard(a, layout, rank, d) if d is not None else a).to(dtype).detach().requires_grad_()
             for a, d in zip(args, dims)]
    s0 = S0.to(dtype).clone().requires_grad_()
    comm.log.reset()
    o, S = distributed(op, local, s0, kw, layout, comm, algo)
    log = comm.log.summary()
    do, dS = cotangents(single(op, args, S0, kw)[0].shape, S.shape)
    do_local = ad.shard(do, layout, rank, dims[0]).to(o.dtype)
    loss = (o * do_local).sum() + (S * dS.to(S.dtype) / W).sum()
    grads = torch.autograd.grad(loss, local + [s0], allow_unused=True)
    out = {"o": ad.unshard(o.detach(), layout, comm, dims[0]).double(),
           "S": S.detach().double(), "log": log, "dS0": None if grads[-1] is None else grads[-1].double()}
    gl = []
    for gr, a, d in zip(grads[:-1], local, dims):
        gr = torch.zeros_like(a) if gr is None else gr
        gl.append((ad.unshard(gr, layout, comm, d) if d is not None else comm.all_reduce(gr)).double())
    out["grads"] = gl
    return out


def max_rel_error(name, results, **sizes):
    """Largest error of every rank's results against the single-process float64 run, relative to the
    largest reference entry of each quantity."""
    o, S, grads = reference(name, **sizes)

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))

    errs = {}
    for r, res in enumerate(results):
        errs[f"o{r}"] = rel(res["o"], o)
        errs[f"S{r}"] = rel(res["S"], S)
        for i, (g, w) in enumerate(zip(res["grads"], grads[:-1])):
            errs[f"d{i}"] = max(errs.get(f"d{i}", 0.0), rel(g, w))
    errs["dS0"] = rel(results[0]["dS0"], grads[-1])
    errs["dS0_elsewhere"] = max((0.0 if r["dS0"] is None else float(r["dS0"].abs().max())) for r in results[1:]) \
        if len(results) > 1 else 0.0
    return errs
