"""Training-speed workloads: the hand-written backward passes against the autograd backward they replaced
(the "landed" engines, run in the same process through `anyattn.backward_switch.autograd_backward`),
and bf16 beside fp32. CPU, B=1, H=8, D=64 (linear family); D=1024, state 16 (selective scan).

* `train_linear`: Gated DeltaNet, KDA and GLA at N=4096 (quick: 256), chunk size 64. Contenders `chunk`
  (hand-written backward) and `chunk_landed` (the previous engine, differentiated by autograd; baseline and
  exact column). The forward column of `chunk` is "its own forward"; fwd+bwd of both give the speedup.
  FLOPs as in `linear_family` (useful work of the chunk algorithm, forward only).
* `train_bf16`: Gated DeltaNet at N=4096: `chunk_fp32`, `chunk_bf16` (q, k, v in bf16: bf16 matmuls with
  fp32 accumulation, gates and states in fp32) and `chunk_fp64` (the exact column: the error of the bf16
  output against float64 is the `rel_fro` of `chunk_bf16`; fp64 is timed forward only).
* `train_mamba`: `selective_scan` with Mamba's arguments (as the `mamba` workload) at L=4096 (quick: 256),
  eager (`compile=False`): `chunk` (hand-written backward) against `chunk_landed` (per-block recomputation
  under autograd; baseline and exact column).
"""
from __future__ import annotations

import torch

from ... import linear as L
from ...backward_switch import autograd_backward
from ..case import Case
from . import linear_family as lf
from . import ssm_family as sf

SIZES, QUICK = (4096,), (256,)


def _landed(fn):
    """fn run through the autograd path (the engines as they were before the hand-written backward)."""
    def run(i):
        with autograd_backward():
            return fn(i)
    return run


def _linear_case(kind, N):
    ours = lf._ours(kind)
    flops = lf._delta_flops(N) if kind in ("gdn", "kda") else lf._decay_flops(N)
    return Case(workload="train_linear", label=f"{kind} N={N}", params=dict(op=kind, B=lf.B, H=lf.H, N=N, D=lf.D, chunk_size=lf.C),
                flops=flops, make_inputs=lambda rg, _k=kind, _n=N: lf._inputs(_k, _n, rg),
                contenders={"chunk": ours, "chunk_landed": _landed(ours)}, baseline="chunk_landed", exact="chunk_landed")


def train_linear_cases(quick: bool) -> list[Case]:
    return [_linear_case(kind, N) for N in (QUICK if quick else SIZES) for kind in ("gdn", "kda", "gla")]


def _bf16_inputs(N, requires_grad):
    """The Gated DeltaNet inputs three times: q, k, v in fp32, bf16 and fp64 (separate leaves); g, beta fp32."""
    base = lf._inputs("gdn", N, False)
    out = {}
    for tag, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp64", torch.float64)):
        for name in ("q", "k", "v"):
            out[f"{name}_{tag}"] = base[name].to(dt, copy=True).requires_grad_(requires_grad)
        gates = torch.float64 if dt == torch.float64 else torch.float32
        for name in ("g", "beta"):
            out[f"{name}_{tag}"] = base[name].to(gates, copy=True).requires_grad_(requires_grad)
    return out


def _gdn(tag):
    return lambda i: L.gated_delta_rule(*(i[f"{n}_{tag}"] for n in ("q", "k", "v", "g", "beta")))


def train_bf16_cases(quick: bool) -> list[Case]:
    return [Case(workload="train_bf16", label=f"gdn N={N}", params=dict(op="gdn", B=lf.B, H=lf.H, N=N, D=lf.D, chunk_size=lf.C),
                 flops=lf._delta_flops(N), make_inputs=lambda rg, _n=N: _bf16_inputs(_n, rg),
                 contenders={"chunk_fp32": _gdn("fp32"), "chunk_bf16": _gdn("bf16"), "chunk_fp64": _gdn("fp64")},
                 baseline="chunk_fp32", exact="chunk_fp64",
                 forward_only={"chunk_fp64": "the float64 reference: its output is the error column, not a contender"})
            for N in (QUICK if quick else SIZES)]


def train_mamba_cases(quick: bool) -> list[Case]:
    cases = []
    for Ln in (QUICK if quick else SIZES):
        ours = sf._mamba_call("chunk", compile=False)
        cases.append(Case("train_mamba", f"L={Ln}", {"B": 1, "D": sf.MAMBA_D, "N": sf.MAMBA_N, "L": Ln},
                          6.0 * sf.MAMBA_D * Ln * sf.MAMBA_N, lambda rg, _l=Ln: sf._mamba_inputs(_l, rg),
                          {"chunk": ours, "chunk_landed": _landed(ours)}, baseline="chunk_landed", exact="chunk_landed"))
    return cases


WORKLOADS = {"train_linear": train_linear_cases, "train_bf16": train_bf16_cases, "train_mamba": train_mamba_cases}
DESCRIPTIONS = {
    "train_linear": "Gated DeltaNet, KDA, GLA forward+backward: hand-written backward vs the landed autograd one",
    "train_bf16": "Gated DeltaNet forward+backward in bf16 vs fp32, error against float64",
    "train_mamba": "selective scan forward+backward: hand-written backward vs the landed autograd one",
}
