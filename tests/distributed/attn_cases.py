"""One sharded attention problem, run on every rank (thread or gloo) and by the float64 oracle.

A case is a dict of plain values (it pickles): sizes, layout kind, mask / bias kind names (spec_zoo),
algo, dtype name, seed. `rank_run(comm, case)` builds the same global inputs on every rank, shards them,
runs `ad.attention` with fixed random cotangents on out and LSE, sums the bias gradients over ranks, and
returns this rank's out, lse, dq, dk, dv, the bias gradients and the byte log. `oracle(case)` gives the
same from the single-process float64 reference; `assemble` puts the ranks' rows in global order.
"""
from __future__ import annotations

import torch

import anyattn
import anyattn.distributed as ad
from spec_zoo import make_bias, make_mask

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def case(W=2, kind="zigzag", B=2, H=4, H_kv=2, m=2, D=8, D_v=6, mask="causal", bias="none", algo="ring",
         dtype="float64", seed=0, **options):
    """m: rows per layout part (N = m * W, or m * 2W for zigzag)."""
    N = m * (2 * W if kind == "zigzag" else W)
    return dict(W=W, kind=kind, B=B, H=H, H_kv=H_kv, N=N, D=D, D_v=D_v, mask=mask, bias=bias, algo=algo,
                dtype=dtype, seed=seed, options=options)


def global_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Hk, N, D, Dv = c["B"], c["H"], c["H_kv"], c["N"], c["D"], c["D_v"]
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64)
               for s in ((B, H, N, D), (B, Hk, N, D), (B, Hk, N, Dv)))
    do = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64)
    dl = torch.randn(B, H, N, generator=g, dtype=torch.float64)
    return q, k, v, do, dl


def _loss(out, lse, do, dl):
    finite = torch.isfinite(lse)
    return (out.double() * do).sum() + (torch.where(finite, lse.double(), 0.0) * dl).sum()


def rank_run(comm, c):
    dtype = DTYPES[c["dtype"]]
    lay = ad.Layout(c["kind"], c["W"], c["N"])
    r = comm.rank
    q, k, v, do, dl = global_inputs(c)
    mask = make_mask(c["mask"], c["B"], c["H"], c["N"], c["seed"])
    bias = make_bias(c["bias"], c["B"], c["H"], c["N"], c["seed"], dtype=torch.float64)
    ql, kl, vl = (ad.shard(x, lay, r).to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = ad.attention(ql, kl, vl, layout=lay, group=comm, mask=mask, bias=bias, algo=c["algo"],
                            return_lse=True, **c["options"])
    fwd_log = comm.log.summary()
    _loss(out, lse, ad.shard(do, lay, r), ad.shard(dl, lay, r)).backward()
    bias_grads = []
    if bias is not None:
        ad.all_reduce_grads(bias, group=comm)
        bias_grads = [t.grad for t in bias.tensors()]
    return dict(out=out.detach(), lse=lse.detach(), dq=ql.grad, dk=kl.grad, dv=vl.grad, dbias=bias_grads,
                log=comm.log.summary(), fwd_log=fwd_log)


def oracle(c):
    q, k, v, do, dl = global_inputs(c)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    mask = make_mask(c["mask"], c["B"], c["H"], c["N"], c["seed"])
    bias = make_bias(c["bias"], c["B"], c["H"], c["N"], c["seed"])
    out, lse = anyattn.attention(q, k, v, mask=mask, bias=bias, method="reference", return_lse=True)
    params = list(bias.tensors()) if bias is not None else []
    grads = torch.autograd.grad(_loss(out, lse, do, dl), [q, k, v] + params, allow_unused=True)
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2], dbias=list(grads[3:]))


def assemble(c, results, key):
    lay = ad.Layout(c["kind"], c["W"], c["N"])
    x = torch.cat([r[key] for r in results], 2)
    order = torch.argsort(torch.cat([lay.positions(s) for s in range(c["W"])]))
    return x.index_select(2, order)


def max_rel_error(c, results, want=None) -> dict:
    """Relative max error of every output and gradient against the oracle (`want`, computed if None)."""
    want = oracle(c) if want is None else want
    errs = {}
    for key in ("out", "lse", "dq", "dk", "dv"):
        got, ref = assemble(c, results, key).double(), want[key]
        if key == "lse":
            assert torch.equal(torch.isinf(got), torch.isinf(ref)), "-inf LSE rows differ"
            fin = torch.isfinite(ref)
            got, ref = got[fin], ref[fin]
        assert torch.isfinite(got).all(), f"{key} has NaN/inf"
        errs[key] = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0
    for i, ref in enumerate(want["dbias"]):
        for r in results:  # after the all-reduce every rank holds the full gradient
            got = r["dbias"][i]
            if ref is None:
                assert got is None or float(got.abs().max()) == 0.0
                continue
            errs[f"dbias{i}"] = max(errs.get(f"dbias{i}", 0.0), float((got.double() - ref).abs().max()
                                                                      / ref.abs().max().clamp_min(1e-30)))
    return errs
